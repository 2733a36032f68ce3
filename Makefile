# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench soak clean proto

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/spiced

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian tools needed by the load benchmarks and soak runs (wrk, h2load, stunnel for wrk under mTLS).
.PHONY: load-tools
load-tools:
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v stunnel4 >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client stunnel4 >/dev/null; }

bench: install load-tools
	$(BIN)/python -m bench

soak: install load-tools
	$(BIN)/python -m bench.soak

# Regenerate the Flight SQL protobuf module from our own message definitions.
proto: install
	$(BIN)/python -m pip install --quiet grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -Ispiced/flight --python_out=spiced/flight --pyi_out=spiced/flight spiced/flight/flight_sql.proto

clean:
	rm -rf $(VENV) .pytest_cache
