# labelmatch — the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch goes in first, pinned, so nothing later pulls a multi-GB CUDA build. On machines without
# the local wheel, set TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs

.PHONY: setup demo test lint bench recipe-probe bench-suite bench-transfer bench-quality bench-tune bench-grpo bench-feedback-poisoning bench-feedback-poisoning-select bench-serve bench-batch bench-labels bench-label-embedding bench-sft-speed bench-drift bench-production-shape bench-peers bench-new-label-share datasets bench-general-adapter bench-adapter-scale train-general-adapter bench-schedule-probe

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	touch $@

## setup: create .venv and install labelmatch with every extra (CPU torch)
setup: $(STAMP)

## demo: the main job on the bundled sample data and encoder
demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m labelmatch.demo --out $(RUNS)/demo

## test: the default test suite on TEST_WORKERS pytest-xdist workers, a file to a worker (0: one process), then the tests that start Ray clusters of their own in a second pytest process
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 -m "not own_process" -n $(TEST_WORKERS) --dist loadfile
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=5 -m own_process

## lint: ruff
lint: setup
	$(VENV)/bin/ruff check src tests bench components pipelines images
	$(VENV)/bin/lint-imports

## bench: every benchmark (JSON + Markdown under bench/results/)
bench: bench-suite bench-transfer bench-quality bench-tune bench-grpo bench-feedback-poisoning bench-serve bench-batch bench-labels bench-label-embedding bench-sft-speed bench-drift bench-production-shape

## bench-suite: every shared dataset, same protocol, baselines side by side, 3 seeds (needs ../shared/data)
bench-suite: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_suite.py --out bench/results

## recipe-probe: a TrainConfig change judged on validation only, bench-suite's protocol, seed 0, e.g.
##   make recipe-probe NAME=ranking-loss SET="ranking_weight=1.0" DATASETS=cuad_clauses,clinc150
recipe-probe: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_recipe_probe.py --name $(NAME) $(foreach s,$(SET),--set $(s)) \
		$(if $(DATASETS),--datasets $(DATASETS))

## bench-transfer: zero-shot transfer to labels never trained on, untrained vs trained (needs ../shared/data)
bench-transfer: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_transfer.py --out bench/results

## bench-peers: labelmatch vs SetFit (same bundled MiniLM, SetFit's defaults, steps capped where they pass 2 h on 2 cores) at 8/16/64 per label and the full split, 3 seeds, with new labels; labelmatch starts from the general adapter trained without the cell's dataset (needs ../shared/data, pip install -e '.[bench]' and `make bench-general-adapter` first, or --base-adapter none; resumes: each seed run is recorded under bench/results/peers_runs, tracked; models in runs/bench-peers)
bench-peers: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_peers.py --out bench/results

## bench-new-label-share: labels added after training, with the weights interpolated between the start adapter and the trained model (WiSE-FT), on validation only (needs bench-peers' kept new-labels models and the held-out adapters; resumes: records in bench/results/new_label_share_runs)
bench-new-label-share: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_new_label_share.py --out bench/results

## datasets: convert HWU64, SNIPS and the news excerpt (public GitHub, pinned commits; bench/datasets/SOURCES.md) into runs/datasets; set HWU64_REPO / SNIPS_REPO / NEWS_REPO to existing clones to skip cloning
HWU64_REPO ?= runs/sources/NLU-Evaluation-Data
SNIPS_REPO ?= runs/sources/nlu-benchmark
NEWS_REPO ?= runs/sources/news-category
datasets: setup
	test -d $(HWU64_REPO) || git clone -q https://github.com/xliuhw/NLU-Evaluation-Data $(HWU64_REPO)
	test -d $(SNIPS_REPO) || git clone -q https://github.com/sonos/nlu-benchmark $(SNIPS_REPO)
	test -d $(NEWS_REPO) || git clone -q https://github.com/Fred-Stock/Correlated-Topic-Modeling-In-Pytorch $(NEWS_REPO)
	$(PY) bench/datasets/convert.py hwu64 --repo $(HWU64_REPO) --out runs/datasets
	$(PY) bench/datasets/convert.py snips --repo $(SNIPS_REPO) --out runs/datasets
	$(PY) bench/datasets/convert.py news --repo $(NEWS_REPO) --out runs/datasets

## bench-general-adapter: the general zero-shot adapter, leave one dataset out, vs the base encoder (needs ../shared/data and `make datasets`)
bench-general-adapter: datasets
	HF_HUB_OFFLINE=1 $(PY) bench/bench_general_adapter.py --out bench/results

## bench-adapter-scale: the share of the general adapter's LoRA delta zero-shot prediction merges (WiSE-FT), chosen on validation rows only (needs bench-general-adapter's held-out adapters)
bench-adapter-scale: datasets
	HF_HUB_OFFLINE=1 $(PY) bench/bench_adapter_scale.py --out bench/results

## train-general-adapter: train the adapter that ships (every mixture dataset) into src/labelmatch/model/general_adapter/, after its leave-one-out table
train-general-adapter: datasets
	HF_HUB_OFFLINE=1 $(PY) bench/bench_general_adapter.py --out bench/results --final

## bench-schedule-probe: few labelled documents: min_steps and the starting adapter, chosen on validation (needs bench-general-adapter's held-out adapters)
bench-schedule-probe: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_schedule_probe.py --out bench/results

## bench-production-shape: a bge-m3-shaped encoder (random weights) through every stage: wall, peak RSS, sizes
bench-production-shape: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_production_shape.py --out bench/results

## bench-quality: recipe history on Reuters-21578 (recipes compared on test: not a headline; the headline is bench-suite) (needs ../shared/data)
bench-quality: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_quality.py --out bench/results

# --- kubernetes: charts and images ---
TOOLS ?= .tools
CHARTS := charts/labelmatch-serving charts/labelmatch-pipelines
HELM = $(shell PYTHON=$(PY) charts/get-helm.sh $(TOOLS))
IMAGE_NAMES ?= base train serve step

.PHONY: helm chart-lint images base-image images-check image-smoke-serve

## helm: print the helm binary, extracting one into .tools/ when none is on PATH
helm: setup
	@echo $(HELM)

## chart-lint: helm lint --strict, helm template for every ci/*.yaml, strict schema validation
chart-lint: setup
	set -e; helm="$(HELM)"; for chart in $(CHARTS); do \
	  "$$helm" lint --strict "$$chart"; \
	  for values in "$$chart"/ci/*.yaml; do \
	    "$$helm" lint --strict "$$chart" -f "$$values" > /dev/null; \
	    "$$helm" template ci "$$chart" -f "$$values" > /dev/null; \
	    echo "rendered $$values"; \
	  done; \
	done
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_chart.py tests/test_images.py

## images: build base/train/serve/step with docker or buildah (PYTHON_IMAGE=local base image when offline)
images:
	images/build.sh $(IMAGE_NAMES)

## base-image: a local Python base image from Debian packages (debootstrap), for machines without a registry
base-image:
	images/base-image.sh

## images-check: build the images with buildah and run them as the cluster would (root; bench/results/images.*)
images-check: setup
	HF_HUB_OFFLINE=1 $(PY) images/check.py --out bench/results

## image-smoke-serve: run the built serve image read-only on 127.0.0.1 (MODEL_DIR=OnnxModel artifact)
image-smoke-serve:
	images/smoke-serve.sh $(MODEL_DIR)

# --- tuning ---
## bench-tune: PBT vs random search at equal compute on bitext_customer_support (needs ../shared/data)
bench-tune: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_tune.py --out bench/results

# --- grpo ---
## bench-grpo: GRPO without forgetting (plain, KL replay, BCE replay, both; Bitext + CLINC150, 3 seeds, the default chosen on dev), then one SFT vs SFT+GRPO run with its curves (needs ../shared/data)
bench-grpo: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_grpo_forgetting.py --out bench/results
	HF_HUB_OFFLINE=1 $(PY) bench/bench_grpo.py --out bench/results

## bench-feedback-poisoning: one principal floods GRPO's feedback (50% of records): test macro-F1 clean vs attacked, with and without the per-principal cap (needs ../shared/data)
bench-feedback-poisoning: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_feedback_poisoning.py --out bench/results

## bench-feedback-poisoning-select: choose the cap and the attack on dev only (other seeds; the test split is not scored)
bench-feedback-poisoning-select: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_feedback_poisoning.py --out bench/results --name feedback_poisoning_select \
	  --parts dev --seeds 10,11,12,13 --attacker-shares 0.5 --attacks scores,targeted --caps 0.1,0.25

# --- export and serving ---
## bench-serve: torch vs every serving engine (ORT fp32/int8 dynamic/int8 static, OpenVINO), the pick, and the HTTP server under load (needs ../shared/data)
bench-serve: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_serve.py --out bench/results

## bench-batch: Ray Data (1, 2 actors) vs a plain ONNX loop on 100k documents (needs ../shared/data)
bench-batch: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_batch.py --out bench/results

## bench-drift: labelmatch monitor on a real shift (Bitext, two categories never trained on): detection and false alarms (needs ../shared/data)
bench-drift: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_drift.py --out bench/results

## bench-labels: SFT step cost by label count, all vs sampled labels, and its F1 cost (needs ../shared/data)
bench-labels: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_labels.py --out bench/results

## bench-label-embedding: label descriptions/s before (one per ONNX run) and after (batched), and 100,000 labels end to end
bench-label-embedding: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_label_embedding.py --out bench/results

## bench-sft-speed: SFT docs/s and validation F1, this code vs the revision before the speed work, on Reuters (needs ../shared/data)
bench-sft-speed: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_sft_speed.py --out bench/results

# --- pipelines ---
.PHONY: compile compile-check
## compile: write the IR of every pipeline to pipelines/compiled/<name>-<version>.yaml
compile: setup
	$(PY) -m pipelines.registry
## compile-check: fail when the committed IR is stale (also a test in `make test`)
compile-check: setup
	$(PY) -m pipelines.registry --check
