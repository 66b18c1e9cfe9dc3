# One command surface: CI runs exactly these targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := proto
PROTOS := $(wildcard proto/podcap/api/v1/*.proto)

.PHONY: setup proto proto-check test lint bench demo clean relink cli-docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=77" wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' --config-settings editable_mode=strict
	touch $@

# Regenerates the checked-in gRPC/protobuf code with the pinned grpcio-tools and mypy-protobuf.
proto: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTOS)

# Fails when the checked-in generated code differs from what `make proto` produces.
proto-check: proto
	@test -z "$$(git status --porcelain -- proto/)" || \
		(git status --short -- proto/; echo "generated code drifted: run make proto and commit" >&2; exit 1)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p podcap.api -p podcap.storage -p podcap.controller -p podcap.agent -p podcap.cli

bench: setup
	$(PY) -m bench

# podcap end to end on the embedded defaults: SQLite, a local directory store, a simulated cluster in network
# namespaces (deploy/local/demo.py). Needs root; on a fresh machine it first installs what it needs, like CI.
# DEMO_ARGS="--keep-running" leaves the cluster up until Ctrl-C; DEMO_ARGS="--workdir DIR" puts the output there.
demo:
	bash .ci/install-system-packages
	$(MAKE) --no-print-directory setup
	$(PY) deploy/local/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# docs/cli.md from the CLI's parser (tests/cli/test_docs.py fails when it drifts).
cli-docs: setup
	$(PY) -m podcap.cli._docs > docs/cli.md

# Strict editable installs link each module file: after adding or removing a module, refresh the links.
relink:
	flock /tmp/podcap-relink.lock $(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=strict
