"""The committed stubs match meshgate.proto (`make proto` was run after the last edit)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from gateway.rpc import meshgate_pb2

RPC = Path(__file__).resolve().parents[2] / "gateway" / "rpc"


def test_generated_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    out = tmp_path / "meshgate.pb"
    # Compare descriptors, not generated text, so that a newer grpcio-tools does not fail this.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{RPC}", f"--descriptor_set_out={out}",
                    str(RPC / "meshgate.proto")], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc fills json_name in; generated code leaves it out
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(meshgate_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "gateway/rpc/meshgate.proto changed: run `make proto` and commit the stubs"


def test_grpc_stub_imports_the_messages_relatively():
    text = (RPC / "meshgate_pb2_grpc.py").read_text()
    assert "from . import meshgate_pb2 as meshgate__pb2" in text
