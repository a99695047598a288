# One command runs the demo, one runs the tests; both set up .venv on first use.
PY ?= python3
VENV ?= .venv
export JAX_PLATFORMS ?= cpu
# Tests run on 8 emulated CPU devices so multi-device code paths are exercised.
TEST_ENV = XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test test-slow venv clean

$(VENV)/.installed: pyproject.toml
	bash scripts/bootstrap.sh $(PY) $(VENV)
	touch $@

venv: $(VENV)/.installed

# The CLI keeps compiled XLA programs in $XDG_CACHE_HOME/jaxattrib/xla (~/.cache/...), so a
# second `make demo` (or a demo in another run dir) skips compilation; see README.
demo: venv
	$(VENV)/bin/jaxattrib demo

test: venv
	$(TEST_ENV) $(VENV)/bin/python -m pytest -n 2 -q --durations=15

test-slow: venv
	$(TEST_ENV) $(VENV)/bin/python -m pytest -n 2 -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
