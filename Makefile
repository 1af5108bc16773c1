# meshgate: `make run` starts the embedded default, `make test` runs the whole suite.
# Each makes its own virtual environment (.venv) and installs what it needs first.
#
# TORCH is the torch requirement. The default lets pip pick a build (a CUDA build on Linux).
# On a machine without a GPU, `make test TORCH=torch==2.13.0` takes the much smaller CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'A-Za-z0-9.\n' '_')

.PHONY: install run run-tls test bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[worker,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/meshgate up --config configs/local.yaml

# The embedded mesh with TLS on every hop (configs/local-tls.yaml), with a development CA made first.
run-tls: $(STAMP)
	test -f certs/ca.pem || $(BIN)/meshgate certs --out certs
	$(BIN)/meshgate up --config configs/local-tls.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.engine

# The gRPC stubs are committed; regenerate them after editing the .proto (grpcio-tools is in the dev
# extra). protoc writes `import meshgate_pb2`, which only works from that folder: make it relative.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I gateway/rpc --python_out=gateway/rpc --pyi_out=gateway/rpc \
		--grpc_python_out=gateway/rpc gateway/rpc/meshgate.proto
	sed -i 's/^import meshgate_pb2 as/from . import meshgate_pb2 as/' gateway/rpc/meshgate_pb2_grpc.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
