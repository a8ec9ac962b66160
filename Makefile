# The two commands a user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.voxplain-installed
DEMO ?= demo

.PHONY: venv test demo benchmark clean

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

test: venv
	$(BIN)/python -m pytest -q

# The main job on the embedded synthetic cohort (under 10 minutes on 2 CPU cores).
demo: venv
	$(BIN)/voxplain generate atrophy --out $(DEMO)/cohort --subjects 80 --sessions 2 \
		--downsample 4 --qc-failures 2 --seed 0
	$(BIN)/voxplain train --cohort $(DEMO)/cohort/cohort.tsv --out $(DEMO)/run --folds 5 --runs 1
	$(BIN)/voxplain mask group --run $(DEMO)/run
	$(BIN)/voxplain mask session --run $(DEMO)/run --folds 0 --max-sessions 4

benchmark: venv
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO)
