# speaker-sim — `make demo` runs the main job, `make test` passes the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
# The CPU build of torch: a plain `torch` requirement would pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
DEFAULT_MODEL := speech_campplus_sv_zh_en_16k-common_advanced
# Two pytest workers (pytest-xdist), one test file each at a time: module-scoped models and the
# Ray cluster stay in one process. PYTEST_XDIST= runs everything in one process.
PYTEST_XDIST ?= -n 2 --dist loadfile

.PHONY: install pretrained demo test test-fast test-portable lint format bench clean

$(BIN)/speaker-sim: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev,ray,onnx,server,storage]'
	touch $@

install: $(BIN)/speaker-sim pretrained

# Make the shared real weights visible as ./pretrained/<model>/ and in the user's pretrained
# folder (found from any working folder; `speaker-sim models` shows where): links, never copies.
pretrained: $(BIN)/speaker-sim
	@mkdir -p pretrained
	@if [ -d "$(SHARED)/pretrained" ]; then \
	  user=$$($(BIN)/python -c "from speaker_sim_cli.models.weights import user_pretrained_dir as u; print(u())"); \
	  mkdir -p "$$user"; \
	  for d in "$(SHARED)"/pretrained/*/; do \
	    n=$$(basename "$$d"); [ -e "pretrained/$$n" ] || ln -s "$$d" "pretrained/$$n"; \
	    if [ -L "$$user/$$n" ] || [ ! -e "$$user/$$n" ]; then ln -sfn "$$d" "$$user/$$n"; fi; \
	  done; \
	else echo "note: $(SHARED)/pretrained not found; put checkpoints under pretrained/<model>/"; fi

demo: install
	$(BIN)/speaker-sim compare pretrained/$(DEFAULT_MODEL)/examples/

# The multi-node Ray tests run in a pytest process of their own, after the rest: in a process
# that already ran a Ray cluster and shut it down (tests/test_ray.py), a second cluster loses the
# actors that process creates ("all references to the actor were removed"), and xdist may hand
# both modules to one worker. With PYTEST_ARGS, one run of what they select.
RAY_CLUSTER_TESTS := tests/test_ray_cluster.py
test: install
ifeq ($(strip $(PYTEST_ARGS)),)
	SPEAKER_SIM_SHARED=$(SHARED) $(BIN)/python -m pytest -q $(PYTEST_XDIST) --ignore=$(RAY_CLUSTER_TESTS)
	SPEAKER_SIM_SHARED=$(SHARED) $(BIN)/python -m pytest -q $(RAY_CLUSTER_TESTS)
else
	SPEAKER_SIM_SHARED=$(SHARED) $(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)
endif

test-fast: install
	SPEAKER_SIM_SHARED=$(SHARED) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_XDIST) \
	  --ignore=$(RAY_CLUSTER_TESTS) $(PYTEST_ARGS)

# The parity tests (stored reference fixtures) under every CPU kernel this machine can emulate:
# torch's dispatch levels and numpy without its AVX-512 paths (docs/portability.md).
PARITY_TESTS := tests/test_mvector.py tests/test_parity.py tests/test_features.py \
	tests/test_funasr.py tests/test_wavlm_sim.py tests/test_archs.py \
	tests/test_mvector_backbones.py tests/test_audio.py
NPY_NO_AVX512 := X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL
test-portable: install
	set -e; for cap in default avx2 avx512; do echo "== ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap SPEAKER_SIM_SHARED=$(SHARED) \
	    $(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS) $(PARITY_TESTS); done
	@echo "== numpy without AVX-512, OpenBLAS Haswell kernels"
	NPY_DISABLE_CPU_FEATURES="$(NPY_NO_AVX512)" OPENBLAS_CORETYPE=Haswell SPEAKER_SIM_SHARED=$(SHARED) \
	  $(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS) $(PARITY_TESTS)

lint: install
	$(BIN)/ruff check speaker_sim_cli tests benchmarks
	$(BIN)/ruff format --check speaker_sim_cli tests benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff format speaker_sim_cli tests benchmarks
	$(BIN)/ruff check --fix speaker_sim_cli tests benchmarks

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'  # rclone (the --s3 server); not for the tests
	$(BIN)/speaker-sim bench --out bench-results/engine.json
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_serve.py --out bench-results/serve.json
	$(BIN)/python benchmarks/bench_warm.py --out bench-results/warm.json
	SPEAKER_SIM_SHARED=$(SHARED) $(BIN)/python benchmarks/bench_store.py --formats --s3 --http --out bench-results/store.json
	$(BIN)/python benchmarks/bench_ray.py --out bench-results/ray.json
	$(BIN)/python benchmarks/bench_ray.py --driver 100000 1000000 10000000 --blocks --unit-rows 4096 --out bench-results/ray-driver.json
	$(BIN)/python benchmarks/bench_ray.py --driver 10000 100000 300000 --api paths --unit-rows 4096 --out bench-results/ray-driver-paths.json
	$(BIN)/python benchmarks/bench_ray.py --scaling --nodes 1 2 1 2 --out bench-results/ray-scaling.json
	$(BIN)/python benchmarks/bench_wavlm.py --seconds 30 --out bench-results/wavlm.json
	$(BIN)/python benchmarks/bench_voiceprints.py --out bench-results/voiceprints.json
	$(BIN)/python benchmarks/bench_voiceprint_service.py --out bench-results/voiceprint-service.json
	$(BIN)/python benchmarks/bench_corpus.py --trials 100000000 --out bench-results/corpus.json

clean:
	rm -rf $(VENV) pretrained .pytest_cache .mypy_cache .ruff_cache build *.egg-info
