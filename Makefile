# glean_oauth: `make demo` to see the whole flow, `make test` to run the tests.
PYTHON ?= python3
VENV := .venv

.PHONY: help demo test run bench

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

demo: ## run glean_oauth.py end to end against a stand-in Glean server (no tenant needed)
	$(PYTHON) test_glean_oauth.py demo

test: ## run the test suite (installs pytest into .venv when $(PYTHON) lacks it)
	@if $(PYTHON) -c 'import pytest' 2>/dev/null; then py='$(PYTHON)'; else \
	  [ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/python -c 'import pytest' 2>/dev/null || $(VENV)/bin/python -m pip install --quiet pytest; \
	  py=$(VENV)/bin/python; fi; \
	$$py -m pytest -q -rs test_glean_oauth.py

run: ## run the real flow; needs CLIENT_ID, CLIENT_SECRET and GLEAN_BACKEND_URL
	$(PYTHON) glean_oauth.py

bench: ## time sign-in runs over TLS with 0, 20 and 100 ms round trips, beside the baseline
	$(PYTHON) test_glean_oauth.py bench
