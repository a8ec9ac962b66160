#!/usr/bin/env bash
# CyCE acceptance run on the 2D synthetic lesion cohort (issue 6; figures in README.md, "## CyCE").
#
#   benchmarks/cyce_acceptance.sh OUT [extra `voxplain cyce train` flags]
#
# Cohort: 1800 patches whose background texture and noise vary per patch, independently of the
# class (--background-variation 2). Classifier: the paper-3 ConvNet, 3 folds, random rotations
# and reflections (--augmentation dihedral), ~2 min with 2 threads. CyCE on fold 0 with one
# thread for 18 minutes (the 20-minute budget of the issue), then the domain transfer and the
# share of each map's mass inside the lesion masks (and within 1 and 3 px of them) on the fold's
# 600 validation patches. Every step resumes if the script is run again.
set -euo pipefail
out=${1:?usage: benchmarks/cyce_acceptance.sh OUT [cyce train flags]}
shift
here=$(cd "$(dirname "$0")" && pwd)
bin=${VOXPLAIN_BIN:-$here/../.venv/bin}

"$bin/voxplain" generate lesions --out "$out/lesions" --subjects 1800 --background-variation 2
"$bin/voxplain" train --cohort "$out/lesions/cohort.tsv" --out "$out/run" --model convnet \
    --folds 3 --epochs 12 --patience 4 --batch-size 16 --augmentation dihedral
OMP_NUM_THREADS=1 "$bin/voxplain" cyce train --run "$out/run" --fold 0 --widths 8,16,32,64 \
    --batch-size 4 --learning-rate 1e-3 --max-steps 6000 --min-steps 6000 --max-seconds 1080 \
    --discriminator-normalisation none "$@"
"$bin/voxplain" cyce transfer --run "$out/run" --fold 0
"$bin/python" "$here/cyce.py" localisation --run "$out/run" --fold 0 --margins 0,1,3
"$bin/python" "$here/cyce.py" background --run "$out/run" --fold 0
