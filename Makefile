# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.deploytool-setup

.PHONY: setup ncnn demo test zoo bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# libncnn for the C++ runner (ncnn-cpp backend, bundles), built from ncnn's sdist on PyPI into
# ${DEPLOYTOOL_CACHE:-~/.cache/deploytool}/ncnn-<version> once (~13 min on 2 cores), then reused;
# and cross-built for aarch64 (ncnn-cpp@aarch64 under qemu-aarch64, bundles for boards) into
# ncnn-<version>-aarch64 (~3 min).
ncnn: setup
	PYTHON=$(BIN)/python bash scripts/build_ncnn.sh
	ARCH=aarch64 PYTHON=$(BIN)/python bash scripts/build_ncnn.sh

demo: setup
	$(BIN)/deploytool run resnet18 --images images --out out/demo \
		--report out/demo/report.json --junit out/demo/junit.xml

# The whole suite. On a machine with more cores than one test uses, run it in parallel with pytest-xdist
# (a test module's tests on one worker, so its fixtures are made once):
#   make test PYTEST_ARGS="-n auto --dist loadfile"
# On 2 cores that is slower (measured: 889 s against 795 s serial): the tests already use both cores.
# First the layers contract in pyproject.toml ([tool.importlinter]): an import against it fails the run.
PYTEST_ARGS ?=
test: setup ncnn
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

# Every spec in models/ on the default backends as one gate: out/zoo/matrix.md, matrix.json, junit.xml.
# Export, conversion and outputs are cached under ~/.cache/deploytool/stages: a rerun only re-judges.
zoo: setup
	$(BIN)/deploytool matrix --out out/zoo

# Latency per backend and ncnn precision variant; regenerates docs/performance.md (~7 min).
bench: setup
	$(BIN)/python scripts/bench.py

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check deploytool tests
	$(BIN)/ruff format --check deploytool tests

format: setup
	$(BIN)/ruff format deploytool tests
	$(BIN)/ruff check --fix deploytool tests

clean:
	rm -rf out build .pytest_cache
