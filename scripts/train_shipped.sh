#!/usr/bin/env bash
# The exact commands that trained the shipped model (src/napari_spinesegdiff/weights/).
# Data: ../shared/data/lumbar (real sagittal lumbar MRI, partial labels) + synthetic phantoms.
# Fold 0 of runs/splits_lumbar.json is held out for testing and never used in training or selection.
# On 2 CPU cores both runs go side by side (one thread each); a GPU is used automatically when present.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SPINESEGDIFF_DATA:-../shared/data}
BASE_ITER=${BASE_ITER:-4500}
DIFF_ITER=${DIFF_ITER:-4000}
RESUME=${RESUME:-}  # set RESUME=--resume to continue interrupted runs from runs/*/last_state.pt
COMMON=(--data "lumbar:$DATA/lumbar" --data phantom:40:1 --splits runs/splits_lumbar.json --fold 0
        --preset small --batch-size 8 --crop 160 160 --val-every 500 --seed 0
        --threads "${THREADS:-1}" --no-progress $RESUME)
mkdir -p runs
# the splits file is created by the first command; start the second once it exists
.venv/bin/spinesegdiff train --kind baseline --iterations "$BASE_ITER" "${COMMON[@]}" --out runs/baseline \
    >> runs/baseline.log 2>&1 &
while [ ! -f runs/splits_lumbar.json ]; do sleep 2; done
.venv/bin/spinesegdiff train --kind diffusion --iterations "$DIFF_ITER" "${COMMON[@]}" --out runs/diffusion \
    >> runs/diffusion.log 2>&1 &
wait
cp runs/baseline/best.safetensors src/napari_spinesegdiff/weights/baseline.safetensors
cp runs/diffusion/best.safetensors src/napari_spinesegdiff/weights/diffusion.safetensors
cp runs/splits_lumbar.json src/napari_spinesegdiff/weights/splits_lumbar.json
