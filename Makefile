# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_STAMP := tests/js/node_modules/.installed

.PHONY: install run test check bench soak clean proto

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,check]'
	touch $(STAMP)

run: install
	$(BIN)/spiced

# Lint and types (configured in pyproject.toml).
check: install
	$(BIN)/ruff check spiced spice_cli tests bench scripts
	$(BIN)/python -m mypy

# The JavaScript SDK the tests use as a client (tests/js), reinstalled when its lockfile changes.
$(JS_STAMP): tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund
	touch $(JS_STAMP)

# Debian packages: PostgreSQL and MariaDB, which the tests start as throwaway servers, and the ODBC
# driver for MariaDB/MySQL, which mysql datasets read through (a no-op when present).
.PHONY: db-tools
db-tools:
	sh scripts/install-db-tools.sh

test: install $(JS_STAMP) db-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian tools needed by the load benchmarks and soak runs (wrk, h2load, stunnel for wrk under mTLS).
.PHONY: load-tools
load-tools:
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v stunnel4 >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client stunnel4 >/dev/null; }

# nginx, the TLS-terminating proxy in front of roapi in the peers section of the benchmarks (Debian's
# package, run by the benchmark as its own foreground process; the image's policy-rc.d keeps the
# package's service from starting).
.PHONY: peer-tools
peer-tools:
	@command -v nginx >/dev/null || command -v /usr/sbin/nginx >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

bench: install load-tools db-tools peer-tools
	$(BIN)/python -m bench

soak: install load-tools
	$(BIN)/python -m bench.soak

# Regenerate the Flight SQL protobuf module from our own message definitions.
proto: install
	$(BIN)/python -m pip install --quiet grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -Ispiced/flight --python_out=spiced/flight --pyi_out=spiced/flight spiced/flight/flight_sql.proto

clean:
	rm -rf $(VENV) .pytest_cache
