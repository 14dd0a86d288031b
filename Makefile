# Each target sets up .venv on first use (or when pyproject.toml changes), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU by default: the test extra installs libtpu (for AOT compiles), which would otherwise
# make JAX probe for a TPU on every start. On a TPU VM run the python commands directly.
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-all info clean

demo: $(VENV)/.installed
	$(PY) -m trainers.pretrain --config configs/tiny.py --workdir $(or $(WORKDIR),workdir/tiny)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ''

info: $(VENV)/.installed
	$(PY) -m gemma_jax.info --model $(or $(MODEL),gemma_2b)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
