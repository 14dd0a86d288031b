# Each target sets up .venv on first use (or when pyproject.toml changes), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU by default: the test extra installs libtpu (for AOT compiles), which would otherwise
# make JAX probe for a TPU on every start. On a TPU VM run the python commands directly.
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-all info clean

demo: $(VENV)/.installed
	$(PY) -m trainers.pretrain --config configs/tiny.py --workdir $(or $(WORKDIR),workdir/tiny)

# The suite runs as three pytest processes, each with a fresh XLA:CPU client: in one long
# process, the 8 emulated devices' collectives deadlocked late in the run on 2 cores.
TEST_GROUPS := 'tests/test_[a-l]*.py' 'tests/test_[m-r]*.py' 'tests/test_[s-z]*.py'

test: $(VENV)/.installed
	for group in $(TEST_GROUPS); do $(PY) -m pytest -q $$group || exit 1; done

test-all: $(VENV)/.installed
	for group in $(TEST_GROUPS); do $(PY) -m pytest -q -m '' $$group || exit 1; done

info: $(VENV)/.installed
	$(PY) -m gemma_jax.info --model $(or $(MODEL),gemma_2b)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
