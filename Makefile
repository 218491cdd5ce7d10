# glean_oauth: `make demo` to see the whole flow, `make test` to run the tests.
PYTHON ?= python3
VENV := .venv

.PHONY: help demo test run bench

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/; s/\$$\(PYTHON\)/$(PYTHON)/g'

demo: ## run glean_oauth.py end to end against a stand-in Glean server (no tenant, no pytest needed)
	$(PYTHON) test_glean_oauth.py demo

test: ## run the test suite (installs pytest into .venv, made by $(PYTHON), when $(PYTHON) lacks it)
	@command -v $(PYTHON) >/dev/null || { echo "make test: $(PYTHON) is not found; give PYTHON=/path/to/python3 (3.6 or newer)" >&2; exit 2; }
	@if $(PYTHON) -c 'import pytest' 2>/dev/null; then py='$(PYTHON)'; else \
	  want=$$($(PYTHON) -c 'import sys; print(sys.version)'); \
	  have=$$($(VENV)/bin/python -c 'import sys; print(sys.version)' 2>/dev/null || true); \
	  if [ "$$want" != "$$have" ]; then rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi; \
	  if ! $(VENV)/bin/python -c 'import pytest' 2>/dev/null; then \
	    set -- $$($(VENV)/bin/python -c 'import sys; v = sys.version_info[:2]; print( \
	      "pip<22 pytest<7.1" if v < (3, 7) else "pip pytest<7.5" if v < (3, 8) else "pip pytest<8.4" \
	      if v < (3, 9) else "pip pytest<9" if v < (3, 10) else "pip pytest")'); \
	    $(VENV)/bin/python -m pip install --quiet --upgrade "$$1" 2>/dev/null || true; \
	    $(VENV)/bin/python -m pip install --quiet "$$2" || exit 1; \
	  fi; \
	  py=$(VENV)/bin/python; fi; \
	$$py -m pytest -q -rs test_glean_oauth.py

run: ## run the real flow; needs CLIENT_ID, CLIENT_SECRET and GLEAN_BACKEND_URL
	$(PYTHON) glean_oauth.py

bench: ## time sign-in runs over TLS with 0, 20 and 100 ms round trips beside the baseline, then token and inspect
	$(PYTHON) test_glean_oauth.py bench
