# One command runs the demo, one runs the tests; both set up .venv on first use.
PY ?= python3
VENV ?= .venv
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-slow venv clean

$(VENV)/.installed: pyproject.toml
	bash scripts/bootstrap.sh $(PY) $(VENV)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/jaxattrib demo

test: venv
	$(VENV)/bin/python -m pytest -n 2 -q

test-slow: venv
	$(VENV)/bin/python -m pytest -n 2 -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
