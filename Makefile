# meshgate: `make run` starts the embedded default, `make test` runs the type check and the whole
# suite. Each makes its own virtual environment (.venv) and installs what it needs first.
#
# TORCH is the torch requirement. Without an NVIDIA GPU (no nvidia-smi) the default comes from
# PyTorch's CPU-only wheel index (TORCH_INDEX), a few hundred MB instead of several GB of CUDA
# wheels; where that index cannot be reached, pip's default index is used and the install says so.
# With a GPU the default is pip's choice (a CUDA build on Linux). `make test TORCH=torch==2.13.0`
# (as CI runs it) installs exactly that requirement from pip's usual indexes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
ifeq ($(origin TORCH),file)
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'A-Za-z0-9.\n' '_')

.PHONY: install run run-tls test check bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifneq ($(TORCH_INDEX),)
	$(BIN)/python -m pip install -q --timeout 20 --index-url '$(TORCH_INDEX)' '$(TORCH)' || { \
	  echo "meshgate: $(TORCH_INDEX) cannot be reached: installing '$(TORCH)' from pip's default index instead (on Linux a CUDA build of several GB)"; \
	  $(BIN)/python -m pip install -q '$(TORCH)'; }
else
	$(BIN)/python -m pip install -q '$(TORCH)'
endif
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

# Static types (pyproject.toml [tool.mypy]): a type error fails the build like a failing test.
check: $(STAMP)
	$(BIN)/python -m mypy

# -rs: every skip prints its reason, so a skip that hides a missing tool shows in the log.
test: $(STAMP) check
	$(BIN)/python -m pytest -q -rs

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
