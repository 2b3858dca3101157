# The two Quick-start commands: `make run` and `make test`. Both set up what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CONFIG ?= config.toml
# Real peers the tests use: DCMTK (storescu, echoscu, dcmdump), Orthanc with its DICOMweb
# plugin, dicom3tools (dciodvfy), Chromium as the browser that reads the node's web pages,
# and PostgreSQL, whose server
# programs Debian keeps off PATH (/usr/lib/postgresql/<version>/bin): the tests start
# throw-away clusters of their own, never the system service.
APT_COMMANDS := storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools chromium:chromium
POSTGRES_INITDB := /usr/lib/postgresql/*/bin/initdb
# Orthanc's DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS), which the test PACS loads.
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so

# The demonstration model: trained on synthetic phantoms only (models/README.md).
DEMO_MODEL := models/effclass-synthetic-demo.pt
DEMO_WORK := var/demo-model
DEMO_CALIBRATED := $(DEMO_WORK)/calibrated.pt

.PHONY: run test bench demo demo-model demo-model-inputs demo-model-evaluate setup system-packages clean

run: $(INSTALLED)
	$(BIN)/ichnode serve --config $(CONFIG)

# Two processes, each test file kept in one (its module fixtures and servers with it),
# each on its own CPU (tests/conftest.py): about 12.5 minutes on 2 cores.
test: $(INSTALLED) system-packages
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(INSTALLED) system-packages
	$(BIN)/python -m bench.run

# The whole loop on loopback: synthetic studies → storescu → node → Orthanc, PNGs in var/demo/.
demo: $(INSTALLED) system-packages
	$(BIN)/python -m demo.run

# Train the demonstration checkpoint from random weights on the CPU (about an hour on 2
# cores), choose its operating point (study sensitivity 0.95) on 100 studies of a seed it
# never trained on, describe its training inputs so that it knows when not to answer, then
# evaluate it on 128 held-out studies of three more seeds and on studies it was not trained
# on, none used for training or for any choice (models/README.md).
demo-model: $(INSTALLED)
	$(BIN)/ichnode synth --out $(DEMO_WORK)/train-studies --studies 160 --seed 1
	$(BIN)/ichnode prepare-rsna --data $(DEMO_WORK)/train-studies --out $(DEMO_WORK)/prepared
	$(BIN)/ichnode train --config models/effclass-synthetic-demo.toml --overwrite
	$(BIN)/ichnode synth --out $(DEMO_WORK)/calibration-studies --studies 100 --seed 5
	$(BIN)/ichnode calibrate --checkpoint $(DEMO_WORK)/experiments/effclass-synthetic-demo/model.pt \
	  --data $(DEMO_WORK)/calibration-studies --target-sensitivity 0.95 --out $(DEMO_CALIBRATED)
	$(MAKE) demo-model-inputs demo-model-evaluate

# The input profile: the training slices' features, the limit fixed on the calibration
# studies, the methods compared on shifted studies of seed 8 (used for no other purpose);
# the scope from the training config. Runs on $(DEMO_CALIBRATED).
demo-model-inputs: $(INSTALLED)
	for shift in contrast noise metal body; do \
	  $(BIN)/ichnode synth --out $(DEMO_WORK)/shifted-$$shift --studies 20 --seed 8 --shift $$shift || exit 1; done
	$(BIN)/ichnode fit-ood --checkpoint $(DEMO_CALIBRATED) --data $(DEMO_WORK)/prepared \
	  --validation $(DEMO_WORK)/calibration-studies $(foreach s,contrast noise metal body,--shifted $(DEMO_WORK)/shifted-$(s)) \
	  --scope-config models/effclass-synthetic-demo.toml --report $(DEMO_WORK)/fit-ood --out $(DEMO_MODEL)

# Held-out synthetic studies of seeds 2, 6 and 7, and the out-of-distribution set (seed 9
# for its synthetic shifts, real CT and MR from pydicom's test files).
demo-model-evaluate: $(INSTALLED)
	$(BIN)/ichnode synth --out $(DEMO_WORK)/heldout-studies --studies 48 --seed 2
	$(BIN)/ichnode synth --out $(DEMO_WORK)/heldout-seed6 --studies 40 --seed 6
	$(BIN)/ichnode synth --out $(DEMO_WORK)/heldout-seed7 --studies 40 --seed 7
	rm -rf $(DEMO_WORK)/ood-set && $(BIN)/ichnode ood-set --out $(DEMO_WORK)/ood-set --seed 9 --studies-per-shift 5
	for set in heldout-studies heldout-seed6 heldout-seed7 ood-set; do \
	  $(BIN)/ichnode evaluate --checkpoint $(DEMO_MODEL) --data $(DEMO_WORK)/$$set \
	    --out $(DEMO_WORK)/evaluation-$$set || exit 1; done

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "ichnode needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	@if [ ! -x $(BIN)/python ]; then \
	  rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python venv is missing: installing the Debian package python3-venv"; \
	    rm -rf $(VENV); $(call apt_install,python3-venv) && $(PYTHON) -m venv $(VENV); }; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

system-packages:
	@missing=""; \
	for pair in $(APT_COMMANDS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v "$${pair%%:*}" >/dev/null 2>&1 \
	    || missing="$$missing $${pair##*:}"; \
	done; \
	ls $(POSTGRES_INITDB) >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -e $(ORTHANC_DICOMWEB) ] || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(call apt_install,$$missing); \
	fi

clean:
	rm -rf $(VENV) .pytest_cache

# apt-get as root, or through sudo for a non-root user.
apt_install = { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(1) >/dev/null; }
