# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: install demo test bench clean

$(BIN)/ctsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/ctsearch

demo: install
	$(BIN)/ctsearch demo $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/train.py && $(BIN)/python bench/index.py && $(BIN)/python bench/search.py && $(BIN)/python bench/relax.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
