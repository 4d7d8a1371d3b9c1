# hybridft: `make demo` and `make test` set up everything a fresh Debian machine needs (as root).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# The tests that need no QEMU and no network namespace (tests/helpers/marker_guard.py fails a test
# that starts either without its marker, so this selection can be trusted).
FAST_MARKERS := not qemu and not netns

# pytest exits 5 when it collected nothing: that is a failure, never a silent pass
define pytest_nonempty
@$(BIN)/pytest $(1) $(PYTEST_ARGS); rc=$$?; \
  if [[ $$rc -eq 5 ]]; then echo "make $@: no tests were collected" >&2; exit 1; fi; exit $$rc
endef

.PHONY: setup demo test test-fast bench lint clean

setup:
	./scripts/setup-host.sh

demo: setup
	./scripts/demo.sh

test: setup
	$(BIN)/ruff check .
	$(call pytest_nonempty,)

test-fast: setup
	$(BIN)/ruff check .
	$(call pytest_nonempty,-m "$(FAST_MARKERS)")

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
