# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: install browser demo test bench clean

$(BIN)/ctsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/ctsearch

demo: install
	$(BIN)/ctsearch demo $(DEMO_OUT)

# Debian's chromium + chromium-driver for the browser test of `ctsearch serve` (tests/test_serve.py),
# installed with apt-get when missing and we are root; otherwise that one test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
		(DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) || \
		echo "warning: apt-get could not install chromium chromium-driver: the browser test will be skipped"; \
	else echo "note: chromium / chromium-driver are not installed (not root): the browser test will be skipped"; fi

test: install browser
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/train.py && $(BIN)/python bench/read.py && $(BIN)/python bench/index.py && $(BIN)/python bench/search.py && $(BIN)/python bench/relax.py && $(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
