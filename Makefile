PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# The CUDA build of torch that also runs on CPU; pip takes it from this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# basicsr 1.4.2: its setup.py imports torch (so no build isolation) and its pins pull
	# opencv-python beside opencv-python-headless and tb-nightly (so no deps; pyproject lists what it needs).
	$(BIN)/pip install -q --no-build-isolation --no-deps basicsr==1.4.2
	# Test-only reference implementation (RealESRGANer) for parity tests and benchmarks; its own pins
	# pull opencv-python, facexlib and gfpgan, none of which RealESRGANer needs.
	$(BIN)/pip install -q --no-deps realesrgan==0.3.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medsr demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-run
