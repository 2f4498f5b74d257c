# FairDRO bundle: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# the stamp changes whenever a requirements file changes, so `make` reinstalls only then
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt | md5sum | cut -c1-12)

DEMO_DIR ?= demo
DEMO_CASES ?= 60
DEMO_EPOCHS ?= 15
DEMO_SEED ?= 0
BUNDLE_RUN := $(PY) -m monai.bundle run
DEMO_RUN = $(abspath $(DEMO_DIR))/run
DEMO_ARGS = --dataset_dir $(DEMO_DIR)/data --output_dir $(DEMO_RUN) --ckpt_dir $(DEMO_RUN)/models --seed $(DEMO_SEED)

# the 2D demo: the synthetic 2D cohort (64x64 PNG), configs/profiles/2d*.json stacked on the 3D configs
DEMO2D_DIR ?= demo-2d
DEMO2D_CASES ?= 1000
DEMO2D_EPOCHS ?= 12
DEMO2D_RUN = $(abspath $(DEMO2D_DIR))/run
DEMO2D_ARGS = --dataset_dir $(DEMO2D_DIR)/data --output_dir $(DEMO2D_RUN) --ckpt_dir $(DEMO2D_RUN)/models --seed $(DEMO_SEED)
CFG2D_TRAIN = "['bundle/configs/train.json','bundle/configs/profiles/2d.json']"
CFG2D_EVAL = "['bundle/configs/train.json','bundle/configs/evaluate.json','bundle/configs/profiles/2d.json','bundle/configs/profiles/2d_evaluate.json']"
CFG2D_INFER = "['bundle/configs/inference.json','bundle/configs/profiles/2d_inference.json']"

.PHONY: help setup demo demo-2d demo-weights verify test lint format clean-demo check-data benchmark-fairness benchmark-hidden-failures calibrate-cohort recipe-sweep bench-dmoe bench-speed bench-gpu

help:
	@echo "make demo   - set up .venv, generate the synthetic cohort, train FairDRO, evaluate, infer"
	@echo "make test   - set up .venv and the system tools (root or passwordless sudo), run the test suite (pytest) and lint"
	@echo "make demo-2d - the same bundle in 2D: synthetic 64x64 cohort, train, evaluate with the report, infer (< 3 min)"
	@echo "make demo-weights - train the shipped weights (synthetic cohort, seed 0) into bundle/models/ + large_files.yml"
	@echo "make verify - every official bundle check (metadata, files, net in/out, export, hashes, config properties)"
	@echo "make lint   - ruff check + format check"
	@echo "make check-data DATALIST=path/to/datalist.json - report every problem in a cohort"
	@echo "make benchmark-fairness - the fairness ablation, 46 cached runs (about 6 h on 2 CPUs); BENCH=smoke: 2 min"
	@echo "    DATALIST=your/datalist.json SUBGROUP_KEY=stage [FOLDS=5 PATIENT_KEY=... PROFILE=2d ...] - on your own data"
	@echo "make benchmark-hidden-failures - positive-control search for the DRO benchmark: 56 cached 2D runs (about 4 h on 2 CPUs); BENCH=smoke: 1 min"
	@echo "    HIDDEN_ARGS='--part compare' - then the comparison on the chosen setting: 48 cached runs, report.md (about 2 h)"
	@echo "make recipe-sweep - FairDRO's apply and min_ess chosen on the validation split (5 cached runs, about 45 min)"
	@echo "make calibrate-cohort - the hidden minority's levels with ERM and the oracle (16 cached runs, about 2.5 h)"
	@echo "make bench-dmoe - dMoE overhead table (each network in its own blocks of steps; round-robin row beside)"
	@echo "make bench-speed - training step, sliding-window and end-to-end inference, CT preprocessing, data loading tables"
	@echo "make bench-gpu - the GPU checks (bf16 dMoE step, CT end to end, clinical profile) into bench/results/gpu"
	@echo "make fuzz-pacs - the DICOM node fed 2000 malformed associations and data sets on loopback (about 5 min); FUZZ_QUICK=1: the CI subset"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $@

# MONAI's verify_net_in_out / ckpt_export do not put the bundle on sys.path (only `run` does): register it in
# the venv so `scripts.*` imports from any working directory
PTH := $(VENV)/lib/python$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages/fairdro_bundle.pth
$(PTH): | $(VENV)/bin/python
	echo "$(abspath bundle)" > $@

# builds (or finds in torch's extension cache) the native dMoE CPU kernels; without a C++ compiler the bundle
# still works on the Python path (bundle docs, Performance)
setup: $(STAMP) $(PTH)
	@$(PY) -m scripts.dmoe_native || echo "note: native dMoE CPU kernels not built; the dMoE layers use the Python path"

demo: setup
	@echo "== 1/5 synthetic cohort (NIfTI + DICOM CT/RTSTRUCT) -> $(DEMO_DIR)/data"
	$(PY) bundle/scripts/synthetic.py --out $(DEMO_DIR)/data --n-cases $(DEMO_CASES) --seed $(DEMO_SEED) --dicom
	@echo "== 2/5 cohort check"
	$(PY) bundle/scripts/check_data.py --datalist $(DEMO_DIR)/data/datalist.json --subgroups T1,T2,T3,T4 -q
	@echo "== 3/5 training FairDRO for $(DEMO_EPOCHS) epochs -> $(DEMO_DIR)/run"
	$(BUNDLE_RUN) training --config_file bundle/configs/train.json $(DEMO_ARGS) --epochs $(DEMO_EPOCHS)
	@echo "== 4/5 evaluation with the fairness report (testing split)"
	$(BUNDLE_RUN) evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" $(DEMO_ARGS)
	@echo "== 5/5 inference on the held-out cases (NIfTI), and one DICOM case (CT series in, SEG + RTSTRUCT out)"
	$(BUNDLE_RUN) inference --config_file bundle/configs/inference.json --dataset_dir $(DEMO_DIR)/data \
		--output_dir $(DEMO_RUN)/inference --ckpt_path $(DEMO_RUN)/models/model.pt
	case_dir=$$($(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/data/datalist.json'))['testing'][0]['dicom_dir'])"); \
	stage=$$($(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/data/datalist.json'))['testing'][0]['stage'])"); \
	$(BUNDLE_RUN) inference --config_file "['bundle/configs/inference.json','bundle/configs/inference_dicom.json']" \
		--input_dir $(DEMO_DIR)/data/$$case_dir --subgroup $$stage --output_dir $(DEMO_RUN)/dicom \
		--ckpt_path $(DEMO_RUN)/models/model.pt
	@echo
	@echo "Headline fairness numbers (testing split):"
	@$(PY) bundle/scripts/fairness_stats.py summary $(DEMO_RUN)
	@echo
	@echo "Outputs:"
	@echo "  cohort:            $(DEMO_DIR)/data/datalist.json"
	@echo "  trained model:     $(DEMO_RUN)/models/model.pt"
	@echo "  TensorBoard logs:  $(DEMO_RUN)"
	@echo "  fairness report:   $(DEMO_RUN)/fairness/report.html"
	@echo "  per-case metrics:  $(DEMO_RUN)/fairness/per_case.csv, $(DEMO_RUN)/fairness/metrics.json"
	@echo "  NIfTI masks:       $(DEMO_RUN)/inference/"
	@echo "  DICOM SEG/RTSTRUCT: $(DEMO_RUN)/dicom/"

demo-2d: setup
	@echo "== 1/5 synthetic 2D cohort (64x64 PNG, hidden 'ring' minority in every stage) -> $(DEMO2D_DIR)/data"
	$(PY) bundle/scripts/synthetic.py --spatial-dims 2 --out $(DEMO2D_DIR)/data --n-cases $(DEMO2D_CASES) --seed $(DEMO_SEED)
	@echo "== 2/5 cohort check"
	$(PY) bundle/scripts/check_data.py --datalist $(DEMO2D_DIR)/data/datalist.json --subgroups T1,T2,T3,T4 -q
	@echo "== 3/5 training FairDRO in 2D for $(DEMO2D_EPOCHS) epochs -> $(DEMO2D_DIR)/run"
	$(BUNDLE_RUN) training --config_file $(CFG2D_TRAIN) $(DEMO2D_ARGS) --epochs $(DEMO2D_EPOCHS)
	@echo "== 4/5 evaluation with the fairness report (testing split)"
	$(BUNDLE_RUN) evaluating --config_file $(CFG2D_EVAL) $(DEMO2D_ARGS)
	@echo "== 5/5 inference on the held-out images (PNG + NIfTI masks)"
	$(BUNDLE_RUN) inference --config_file $(CFG2D_INFER) --dataset_dir $(DEMO2D_DIR)/data \
		--output_dir $(DEMO2D_RUN)/inference --ckpt_path $(DEMO2D_RUN)/models/model.pt
	@echo
	@echo "Headline fairness numbers (testing split):"
	@$(PY) bundle/scripts/fairness_stats.py summary $(DEMO2D_RUN)
	@echo
	@echo "Outputs:"
	@echo "  cohort:            $(DEMO2D_DIR)/data/datalist.json"
	@echo "  trained model:     $(DEMO2D_RUN)/models/model.pt"
	@echo "  fairness report:   $(DEMO2D_RUN)/fairness/report.html"
	@echo "  per-case metrics:  $(DEMO2D_RUN)/fairness/per_case.csv, $(DEMO2D_RUN)/fairness/metrics.json"
	@echo "  masks (PNG+NIfTI): $(DEMO2D_RUN)/inference/"

# the shipped weights: default FairDRO config, synthetic cohort, fixed seed; then TorchScript and large_files.yml.
# RELEASE_URL: where a published GitHub release puts the assets (written into large_files.yml)
WEIGHTS_RUN = $(DEMO_DIR)/weights_run
RELEASE_URL ?= https://github.com/OWNER/REPO/releases/download/v{version}
demo-weights: setup
	@test -f $(DEMO_DIR)/data/datalist.json || \
		$(PY) bundle/scripts/synthetic.py --out $(DEMO_DIR)/data --n-cases $(DEMO_CASES) --seed $(DEMO_SEED)
	$(BUNDLE_RUN) training --config_file bundle/configs/train.json --dataset_dir $(DEMO_DIR)/data \
		--output_dir $(WEIGHTS_RUN) --ckpt_dir $(WEIGHTS_RUN)/models --epochs $(DEMO_EPOCHS) --seed $(DEMO_SEED)
	cp $(WEIGHTS_RUN)/models/model.pt bundle/models/model.pt
	$(PY) -m monai.bundle ckpt_export network_def --filepath bundle/models/model.ts \
		--ckpt_file bundle/models/model.pt --meta_file bundle/configs/metadata.json \
		--config_file bundle/configs/inference.json
	$(PY) tools/write_large_files.py --bundle-dir bundle --url-base "$(RELEASE_URL)"

# every official check; fails on the first problem. The metadata schema is the shipped tools/schemas/ copy (no
# network), or BUNDLE_META_SCHEMA=path/to/schema.json
verify: setup
	$(PY) tools/verify_bundle.py --bundle-dir bundle

check-data: setup
	@test -n "$(DATALIST)" || { echo "usage: make check-data DATALIST=path/to/datalist.json"; exit 2; }
	$(PY) bundle/scripts/check_data.py --datalist $(DATALIST) $(CHECK_ARGS)

# the hidden minority's difficulty levels, calibrated with ERM and the oracle only (runs cached in bench/results/calibration)
calibrate-cohort: setup
	$(PY) bench/calibrate_cohort.py $(CALIBRATE_ARGS)

recipe-sweep: setup
	$(PY) bench/recipe_sweep.py $(RECIPE_ARGS)

# BENCH=full: the ablation plan into bench/results/ablation (runs cached); BENCH=smoke: 3 tiny runs in .bench_work
BENCH ?= full
# with DATALIST: the same benchmark on your own datalist (bench/benchmark_datalist.py, bundle/docs/your_data.md):
# SUBGROUP_KEY (required), VARIANTS, SEEDS, FOLDS (k-fold cross-validation), PATIENT_KEY, PROFILE (2d, fairseg,
# ham10000, gpu), EPOCHS, OUT (runs, cache, report), EXPORT (the winner as a bundle), DATALIST_ARGS (other options)
VARIANTS ?= erm,dmoe,fairdro
SEEDS ?= 3
OUT ?= runs/benchmark-$(basename $(notdir $(DATALIST)))
benchmark-fairness: setup
ifdef DATALIST
	@test -n "$(SUBGROUP_KEY)" || { echo "usage: make benchmark-fairness DATALIST=path/to/datalist.json SUBGROUP_KEY=stage [FOLDS=5 ...]"; exit 2; }
	$(PY) bench/benchmark_datalist.py --datalist $(DATALIST) --subgroup-key $(SUBGROUP_KEY) --variants $(VARIANTS) \
		--seeds $(SEEDS) --out $(OUT) $(if $(FOLDS),--folds $(FOLDS)) $(if $(PATIENT_KEY),--patient-key $(PATIENT_KEY)) \
		$(if $(PROFILE),--profile $(PROFILE)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(EXPORT),--export $(EXPORT)) $(DATALIST_ARGS)
else
	$(PY) bench/fairness_ablation.py --bench $(BENCH) $(ABLATION_ARGS)
endif

# issue 29: can a benchmark see a loss effect? Part 1 (default): the oracle gaps on 2D settings; part 2
# (HIDDEN_ARGS='--part compare'): 8 variants x 5 seeds on the chosen setting, report.md (runs cached in
# bench/results/hidden_failures; HIDDEN_ARGS='--commit --threads 1' commits each run, '--max-runs N' time-boxes)
benchmark-hidden-failures: setup
	$(PY) bench/hidden_failures.py --bench $(BENCH) $(HIDDEN_ARGS)

bench-dmoe: setup
	$(PY) bench/bench_dmoe.py

bench-speed: setup
	$(PY) bench/bench_speed.py --channels-last

# the GPU checks of the speed goals, on a machine with a CUDA GPU (no setup: it uses that machine's python3 and torch)
bench-gpu:
	bash bench/gpu_check.sh

# system-tools first: installs tools/system-packages.txt (plastimatch, dicom3tools, dcmtk, libgdcm-tools, g++) as root
# or with passwordless sudo, else says once which command would; -rs lists every skipped test with its reason;
# FAIRDRO_NO_SKIP=1 (as .ci/run) fails the run on any skip
.PHONY: system-tools
system-tools:
	@$(PYTHON) tools/system_tools.py

test: system-tools setup lint
	$(PY) -m pytest -q -rs tests

lint: setup
	$(PY) -m ruff check bundle tests bench tools deploy
	$(PY) -m ruff format --check bundle tests bench tools deploy

format: setup
	$(PY) -m ruff check --fix bundle tests bench tools deploy
	$(PY) -m ruff format bundle tests bench tools deploy

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO2D_DIR)

# MONAI Label 0.8.5 in its own venv: it needs pydicom 2.x and numpy<2 (pydicom-seg), which the main venv cannot
# share. monai is pinned to 1.5.2 there: under monai 1.6.1 every Spacingd crashes in MONAI Label (it walks the
# data keys starting with "image_" and MONAI Label's "image_path" string is one of them).
ML_VENV := .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_CONSTRAINTS := tools/monailabel-constraints.txt
ML_PINS := monailabel==0.8.5 monai==1.5.2 "pydicom>=2.4,<2.5" "numpy<2" torch==2.13.0
ML_STAMP := $(ML_VENV)/.installed-$(shell echo '$(ML_PINS)' | cat - $(ML_CONSTRAINTS) | md5sum | cut -c1-12)

.PHONY: monailabel test-monailabel

$(ML_STAMP): $(ML_CONSTRAINTS)
	test -x $(ML_PY) || $(PYTHON) -m venv $(ML_VENV)
	$(ML_PY) -m pip install --quiet --upgrade "pip>=25"
	$(ML_PY) -m pip install --quiet torch==2.13.0
	# SAM2_BUILD_CUDA=0 and the build constraint keep sam2's source build on the CPU torch (else it pulls CUDA torch)
	SAM2_BUILD_CUDA=0 $(ML_PY) -m pip install --quiet $(ML_PINS) -c $(ML_CONSTRAINTS) --build-constraint $(ML_CONSTRAINTS)
	rm -f $(ML_VENV)/.installed-*
	touch $@

monailabel: $(ML_STAMP)

# round trip through a MONAI Label server (loopback) against the bundle's own inference, then the negative test
# (a 'module.'-prefixed model.pt must be caught), then training through MONAI Label's bundle trainer; all run,
# the target fails if any fails
test-monailabel: setup monailabel
	@w=$$(mktemp -d); trap 'rm -rf "$$w"' EXIT; rc=0; \
	nice -n 10 $(PY) tools/monailabel_roundtrip.py --work "$$w/rt" --ml-python $(abspath $(ML_PY)) || rc=1; \
	nice -n 10 $(PY) tools/monailabel_roundtrip.py --work "$$w/rt" --ml-python $(abspath $(ML_PY)) --expect-mismatch || rc=1; \
	env -u PYTHONPATH nice -n 10 $(ML_PY) tools/monailabel_train.py || rc=1; \
	exit $$rc

# MONAI Deploy App SDK 4.0.0 in its own venv (holoscan is large and only the Deploy app needs it)
DP_VENV := .venv-deploy
DP_PY := $(DP_VENV)/bin/python
DP_REQ := deploy/requirements.txt
DP_STAMP := $(DP_VENV)/.installed-$(shell cat $(DP_REQ) constraints.txt | md5sum | cut -c1-12)

.PHONY: deploy-env deploy-app test-deploy deploy-stage

$(DP_STAMP): $(DP_REQ) constraints.txt
	test -x $(DP_PY) || $(PYTHON) -m venv $(DP_VENV)
	$(DP_PY) -m pip install --quiet --upgrade "pip>=25"
	$(DP_PY) -m pip install --quiet torch==2.13.0
	$(DP_PY) -m pip install --quiet -r $(DP_REQ) -c constraints.txt
	rm -f $(DP_VENV)/.installed-*
	touch $@

deploy-env: $(DP_STAMP)

# the Deploy app on synthetic DICOM series (several storage orders, oblique), against the bundle's own inference
test-deploy: setup deploy-env
	nice -n 5 $(PY) tools/deploy_check.py --deploy-python $(abspath $(DP_PY))

# run the app: make deploy-app INPUT=<CT series folder> OUTPUT=<folder> [SUBGROUP=T2]
deploy-app: deploy-env
	@test -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "usage: make deploy-app INPUT=<CT DICOM folder> OUTPUT=<folder> [SUBGROUP=T1..T4]"; exit 2; }
	ulimit -s 32768; FAIRDRO_SUBGROUP="$(SUBGROUP)" LD_LIBRARY_PATH="$$(echo $(abspath $(DP_VENV))/lib/python3*/site-packages/nvidia/cu13/lib):$$LD_LIBRARY_PATH" \
	$(DP_PY) deploy/app.py -i "$(INPUT)" -o "$(OUTPUT)" -m bundle/models/model.ts

# a self-contained app folder for `monai-deploy package` (app, operators, the bundle's scripts, metadata)
DP_STAGE ?= build/deploy-app
deploy-stage:
	rm -rf $(DP_STAGE) && mkdir -p $(DP_STAGE)/configs
	cp deploy/app.py deploy/fairdro_operators.py deploy/app.yaml deploy/requirements.txt $(DP_STAGE)/
	cp -r bundle/scripts $(DP_STAGE)/scripts && rm -rf $(DP_STAGE)/scripts/__pycache__
	cp bundle/configs/metadata.json $(DP_STAGE)/configs/
	@echo "staged in $(DP_STAGE); package with: monai-deploy package $(DP_STAGE) -c $(DP_STAGE)/app.yaml -m bundle/models/model.ts -t fairdro-ctv:0.7.0 --platform x64-workstation"

# the DICOM node (receives CT, returns RTSTRUCT/SEG): make dicom-node [NODE_CONFIG=site.json] [NODE_ARGS='--port 11113']
# (NODE_ARGS=--cold builds the inference workflow for every series instead of once per process)
NODE_CONFIG ?=
NODE_ARGS ?=
.PHONY: dicom-node test-pacs bench-pacs soak-pacs orthanc
dicom-node: setup
	PYTHONPATH=deploy $(PY) -m dicom_node --config deploy/dicom_node.json $(NODE_CONFIG) $(NODE_ARGS)

# the clinical loop against a real Orthanc (Debian orthanc + orthanc-dicomweb, installed when missing), plain and over
# DICOM TLS with a throw-away CA (tools/testcerts.py)
# dcmtk: tools/pacs_check.py encodes a JPEG-lossless series with dcmcjpeg for the compressed round trip
ORTHANC_PKGS := orthanc orthanc-dicomweb dcmtk
orthanc:
	@command -v Orthanc >/dev/null && command -v dcmcjpeg >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  export DEBIAN_FRONTEND=noninteractive; SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $(ORTHANC_PKGS) >/dev/null; }

test-pacs: setup orthanc
	nice -n 5 $(PY) tools/pacs_check.py

# issue 31: the node fed malformed associations and data sets (mutated valid traffic) with valid series interleaved,
# loopback only, no Orthanc (a stand-in PACS receives the results); writes the JSON and runs tools/fuzz_pacs_check.py.
# FUZZ_QUICK=1: the seeded CI subset (300 cases, 2 valid series, < 3 min), its JSON in the work folder
FUZZ_SEED ?= 0
FUZZ_QUICK ?=
.PHONY: fuzz-pacs
fuzz-pacs: setup
	$(PY) tools/fuzz_pacs.py --seed $(FUZZ_SEED) $(if $(FUZZ_QUICK),--quick,--out bench/results/pacs/fuzz_pacs.json)

# per-series latency with the node started --cold, then warm (the default), and SIGKILL recovery, against Orthanc
bench-pacs: setup orthanc
	$(PY) bench/bench_pacs.py --series 10 --out bench/results/pacs/bench_pacs.json

# the node under faults for SOAK_SECONDS (>= 900 for a reported run), loopback, TLS on: several senders, SIGKILLs,
# a destination outage, the disk floor crossed once (a 4 GiB file for a minute); writes and checks the JSON
SOAK_SECONDS ?= 960
soak-pacs: setup
	$(PY) bench/soak_pacs.py --seconds $(SOAK_SECONDS) --out bench/results/pacs/soak_pacs.json
