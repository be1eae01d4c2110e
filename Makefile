# exem developer targets. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

DEMO_DIR ?= outputs/demo/latest
SYNTH := data/synthetic

# Train on synthetic phantoms, translate the held-out phantom, compare with its EM rendering.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/exem-train experiment=demo hydra.run.dir=$(DEMO_DIR)
	$(VENV)/bin/exem-translate checkpoint=$(DEMO_DIR)/checkpoints/last.ckpt input=$(SYNTH)/exm_test.zarr \
		output=$(DEMO_DIR)/virtual_em_test.ome.zarr patch=[8,64,64] trainer=cpu
	$(PY) -m exem.analysis.compare --exm $(SYNTH)/exm_test.zarr --virtual-em $(DEMO_DIR)/virtual_em_test.ome.zarr \
		--em $(SYNTH)/em_test.zarr --out $(DEMO_DIR)/translation_test.png

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
