# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.deploytool-setup

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/deploytool run resnet18 --images images --out out/demo \
		--report out/demo/report.json --junit out/demo/junit.xml

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check deploytool tests
	$(BIN)/ruff format --check deploytool tests

format: setup
	$(BIN)/ruff format deploytool tests
	$(BIN)/ruff check --fix deploytool tests

clean:
	rm -rf out build .pytest_cache
