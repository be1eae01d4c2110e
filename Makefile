# exem developer targets. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
# pip arguments for PyTorch, installed before exem (shell words: a CUDA build adds its index,
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"; quote a range inside: "'torch>=2.13,<2.14'").
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint format clean bench bench-gpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

DEMO_DIR ?= outputs/demo/latest
DEMO_ARGS ?=
SYNTH := data/synthetic

# Train on synthetic phantoms, translate the held-out phantom, compare with its EM rendering, then segment
# mitochondria with the built-in EM-trained segmenter on EM, virtual EM and raw ExM and print the scores; last,
# measure the antibody channel per mitochondrion found on the virtual EM and compare the positive calls with the
# phantom's truth.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/exem-train experiment=demo hydra.run.dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(VENV)/bin/exem-translate checkpoint=$(DEMO_DIR)/checkpoints/last.ckpt input=$(SYNTH)/exm_test.zarr \
		output=$(DEMO_DIR)/virtual_em_test.ome.zarr trainer=cpu
	$(PY) -m exem.analysis.compare --exm $(SYNTH)/exm_test.zarr --virtual-em $(DEMO_DIR)/virtual_em_test.ome.zarr \
		--em $(SYNTH)/em_test.zarr --out $(DEMO_DIR)/translation_test.png
	$(VENV)/bin/exem-evaluate exm=$(SYNTH)/exm_test.zarr checkpoint=$(DEMO_DIR)/checkpoints/last.ckpt \
		segmenter=exem/assets/segmenters/em_mito.pt labels=$(SYNTH)/mito_test.zarr em=$(SYNTH)/em_test.zarr \
		out=$(DEMO_DIR)/evaluation trainer=cpu
	$(VENV)/bin/exem-measure labels=$(DEMO_DIR)/evaluation/segment_virtual_em.zarr \
		images=[$(SYNTH)/antibody_test.zarr] names=[antibody] "positive_threshold={antibody: otsu}" \
		expansion_factor=4.0 out=$(DEMO_DIR)/measure overwrite=true
	$(PY) -m exem.analysis.positives --objects $(DEMO_DIR)/measure/objects.csv \
		--labels $(DEMO_DIR)/evaluation/segment_virtual_em.zarr --truth $(SYNTH)/mito_test.zarr \
		--antibody $(SYNTH)/antibody_test.zarr

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

BENCH_DIR ?= outputs/bench

# CPU benchmarks (--size tiny), each side by side with its yardstick; logs in $(BENCH_DIR), ratios printed last.
# About 2.5 minutes on 2 idle cores. GPU sizes: see benchmarks/RESULTS.md.
bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(PY) benchmarks/translate_overhead.py --size tiny --repeats 5 > $(BENCH_DIR)/translate_overhead.log
	$(PY) benchmarks/bench_translate.py --size tiny --device cpu > $(BENCH_DIR)/translate.log
	$(PY) benchmarks/bench_train.py --size tiny --device cpu > $(BENCH_DIR)/train.log
	$(PY) benchmarks/seams.py --png $(BENCH_DIR)/seams.png > $(BENCH_DIR)/seams.log
	$(PY) benchmarks/engine_ceiling.py > $(BENCH_DIR)/engine_ceiling.log
	$(PY) benchmarks/ratios.py $(BENCH_DIR)/translate_overhead.log $(BENCH_DIR)/translate.log $(BENCH_DIR)/train.log \
		$(BENCH_DIR)/seams.log $(BENCH_DIR)/engine_ceiling.log

BENCH_GPU_DIR ?= outputs/bench-gpu
SEAMS_CHECKPOINT ?=
CUDA_CHECK := import sys, torch; sys.exit(None if torch.cuda.is_available() else f"bench-gpu: torch {torch.__version__} \
	sees no CUDA device; run it on a GPU host in a .venv made with a CUDA build (make clean; make bench-gpu TORCH_SPEC=...)")

# GPU figures of issue 13 (benchmarks/RESULTS.md; estimated 15 minutes on one H100, not yet run): the default training
# step of the published generator, the engine ceiling, translation side by side with the published stitching, and
# exem-translate end to end on 128x2048x2048; each goal printed last, met or not. SEAMS_CHECKPOINT=<a published-width
# exem-train last.ckpt> adds the seams at 12.5 % overlap and at a patch twice the training patch in-plane. A failed
# benchmark does not stop the others (its log has no JSON line, which ratios.py reports).
bench-gpu: $(STAMP)
	$(PY) -c '$(CUDA_CHECK)'
	mkdir -p $(BENCH_GPU_DIR)
	rm -f $(BENCH_GPU_DIR)/*.log
	-$(PY) benchmarks/bench_train.py --size published --device cuda > $(BENCH_GPU_DIR)/train.log
	-$(PY) benchmarks/engine_ceiling.py --device cuda --shape 128 2048 2048 --repeats 3 --baseline 0 \
		> $(BENCH_GPU_DIR)/engine_ceiling.log
	-$(PY) benchmarks/bench_translate.py --size published --device cuda > $(BENCH_GPU_DIR)/translate.log
	-$(PY) benchmarks/bench_translate.py --size large --device cuda > $(BENCH_GPU_DIR)/translate_large.log
	-$(PY) benchmarks/bench_translate.py --size large --device cuda --cli-args batch_size=32 num_workers=8 \
		> $(BENCH_GPU_DIR)/translate_large_b32.log
	-$(if $(SEAMS_CHECKPOINT),$(PY) benchmarks/seams.py --checkpoint $(SEAMS_CHECKPOINT) --shape 32 1024 1024 \
		--patch 16 256 256 --larger 512 --png $(BENCH_GPU_DIR)/seams.png > $(BENCH_GPU_DIR)/seams.log)
	$(PY) benchmarks/ratios.py $(BENCH_GPU_DIR)/*.log

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
