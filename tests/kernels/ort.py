"""onnxruntime on the CPU standing in for TensorRT: the exported segments run as a runner's engines."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gateway.config import TinyModelConfig
from kernels.onnx_export import SegmentSpec

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's dynamo ONNX exporter

# head_dim 64 (a size the attention kernels take), GQA 2:1, two layers: every segment kind twice
TINY = TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)


class OrtEngine:
    """kernels.trt_engine.Engine's call shape: (*inputs) -> outputs in the spec's order."""

    def __init__(self, path: Path, spec: SegmentSpec):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.spec = spec
        self.calls: list[int] = []  # rows per call
        self.slots: set[int | None] = set()  # the contexts a TensorRT engine would have used

    def __call__(self, *inputs: torch.Tensor, slot: int | None = None) -> tuple[torch.Tensor, ...]:
        feed = {s.name: t.contiguous().numpy() for s, t in zip(self.spec.inputs, inputs, strict=True)}
        outs = self.session.run([s.name for s in self.spec.outputs], feed)
        self.calls.append(int(inputs[0].shape[0]))
        self.slots.add(slot)
        return tuple(torch.from_numpy(o) for o in outs)
