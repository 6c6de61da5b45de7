PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

# One install recipe for this venv and the cluster image (cluster/Dockerfile): cluster/install.sh. pip's output goes
# to $(VENV)/install.log; the terminal shows one line per step (and the log's tail when a step fails).
$(STAMP): pyproject.toml Makefile cluster/install.sh
	@bash cluster/install.sh --venv $(VENV) --python $(PY) --extras test --log $(VENV)/install.log
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medsr demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-run
