# The two commands a user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.voxplain-installed
# the folder pipelines/demo.toml writes
DEMO := demo

.PHONY: venv browser test demo benchmark clean

venv: $(STAMP)

# torch first from the local CPU build, then the package constrained to that torch, so that no
# dependency (captum, torchmetrics, monai) can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-'; then \
		echo "error: CUDA packages (nvidia-*) were installed; check constraints.txt" >&2; exit 1; fi
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^torchvision '; then \
		echo "error: torchvision was installed; it does not import with the CPU torch" >&2; exit 1; fi
	touch $(STAMP)

# The report and user-study tests open pages in headless Chromium (Debian: chromium +
# chromium-driver). Installed here when missing and apt-get is usable (root or sudo); without it
# those tests are skipped with the reason printed.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "warning: chromium not installed (no apt-get as root): browser tests will be skipped" >&2; fi

# lint-imports: the layers of voxplain (pyproject.toml [tool.importlinter], README
# "Architecture") and no import cycle; then the tests.
test: venv browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The main job on the embedded synthetic cohort (under 10 minutes on 2 CPU cores): the pipeline
# file pipelines/demo.toml is its specification (steps, settings, and why), then the summary.
demo: venv
	$(BIN)/voxplain run pipelines/demo.toml
	$(BIN)/voxplain summary --run $(DEMO)/run

# Ratios measured in one run (see benchmarks/README.md); the full grid takes most of the time.
# report_load.py needs a run folder: `$(BIN)/python benchmarks/report_load.py $(DEMO)/run`.
benchmark: venv
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/masks.py
	$(BIN)/python benchmarks/attributions.py
	$(BIN)/python benchmarks/evaluation.py
	$(BIN)/python benchmarks/model_randomisation.py

clean:
	rm -rf $(VENV) $(DEMO)
