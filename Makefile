# The two commands of the README. Each sets up .venv (and the Debian packages) if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench-quick bench protos check-protos clean

$(STAMP): pyproject.toml scripts/bootstrap.sh clients/node/package-lock.json
	bash scripts/bootstrap.sh

setup: $(STAMP)

## The main job: the end-to-end demo on the embedded stack, real Fashion-MNIST.
demo: $(STAMP)
	$(VENV)/bin/ftps-stack demo $(DEMO_ARGS)

## The test suite (fast path; slow tests: make test-slow).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

## Every benchmark of the README's Results in its quick mode (~10 min; figures at lower precision),
## or in full (over an hour). Outputs in bench/out/.
bench-quick: $(STAMP)
	$(PY) -m bench.attacks --quick && $(PY) -m bench.finetune --quick && $(PY) -m bench.e2e --quick

bench: $(STAMP)
	$(PY) -m bench.attacks && $(PY) -m bench.finetune && $(PY) -m bench.e2e

## Regenerate ftps/v1/*_pb2*.py from protos/ with the pinned grpcio-tools, and the Node.js client's
## clients/node/gen/ with the pinned buf + protoc-gen-es; then lint the protos.
protos: $(STAMP)
	bash scripts/protoc.sh
	bash clients/node/generate.sh
	bash scripts/buf.sh lint

clean:
	rm -rf $(VENV) .pytest_cache clients/node/node_modules
