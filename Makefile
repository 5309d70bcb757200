# Two commands set everything up on a machine with only python3 and make:
#   make demo   -- run the whole mesh on the embedded backend
#   make test   -- run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTO_FILES := $(shell find protos/profilemesh -name '*.proto' -not -path '*/shared/*' -not -path '*/services/*' -not -path '*/plugins/*' | sort)

.PHONY: install test demo up protos check-protos lint format bench breaking clean

# The virtualenv is rebuilt whenever pyproject.toml changes.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	$(BIN)/pytest -q

demo: $(INSTALLED)
	$(BIN)/profilemesh demo

up: $(INSTALLED)
	$(BIN)/profilemesh up

# Regenerate the Python code and .pyi stubs beside every .proto file.
protos: $(INSTALLED)
	find protos/profilemesh -name '*_pb2*.py*' -not -path '*/shared/*' -not -path '*/services/*' -not -path '*/plugins/*' -delete
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=protos --grpc_python_out=protos \
		--mypy_out=quiet:protos --mypy_grpc_out=quiet:protos \
		$(PROTO_FILES)

# Fails when the committed generated code differs from what `make protos` produces.
check-protos: protos
	git diff --exit-code -- protos
	test -z "$$(git ls-files --others --exclude-standard -- protos)"

lint: $(INSTALLED)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p profilemesh.shared -p profilemesh.services -p profilemesh.plugins

format: $(INSTALLED)
	$(BIN)/buf format -w
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Contracts must stay wire-compatible with what is on main.
breaking: $(INSTALLED)
	$(BIN)/buf breaking --against '.git#branch=main'

# Every benchmark, one JSON file and a markdown table (add --quick for a fast pass).
bench: $(INSTALLED)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info
