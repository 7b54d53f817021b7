# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv when missing and install the project with the CPU build of torch pinned.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_run

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install whenever the dependency files change.
$(STAMP): $(PY) pyproject.toml requirements-dose.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]" "$(TORCH_PIN)"
	$(PIP) install -q --no-deps -r requirements-dose.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latent demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pylint --disable=all --enable=duplicate-code --score=n latent encode cache translate decode
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
