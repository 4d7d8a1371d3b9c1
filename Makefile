# hybridft: `make demo` and `make test` set up everything a fresh Debian machine needs (as root).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup:
	./scripts/setup-host.sh

demo: setup
	./scripts/demo.sh

test: setup
	$(BIN)/ruff check .
	@# pytest exits 5 when it collected nothing: that is a failure, never a silent pass
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	  if [[ $$rc -eq 5 ]]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/hybridft bench compare
	$(BIN)/hybridft bench disk
	$(BIN)/hybridft bench qemu
	$(BIN)/hybridft bench pair

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
