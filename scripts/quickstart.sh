#!/usr/bin/env bash
# Set everything up and run the main job on the embedded backbone (SmolLM2-135M-Instruct):
# every stage of `trinityx run --config configs/quick.yaml`, from data splits to runs/quick/report.html.
# Data: $TRINITYX_DATA_DIR, else ../shared/data (this repository's CI layout).
# The judges are trained once (301 s on a quiet fresh 2-core machine) into ~/.cache/trinityx/judges and shared by every
# later run; `run` trains any that are missing.
source "$(dirname "$0")/setup.sh"
export TRINITYX_DATA_DIR="${TRINITYX_DATA_DIR:-$(cd .. && pwd)/shared/data}"
trinityx run --config configs/quick.yaml --out runs/quick "$@"
