#!/usr/bin/env bash
# Regenerate every table and plot the README quotes (needs ../shared or $ONNXQ_SHARED; hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/pass_speed.py --bits 4 --repeat 3 --quality | tee bench/results/pass_speed.txt
python bench/methods.py
python bench/mixed_precision.py --exact-models squeezenet1.1
python bench/calib_memory.py
if [ -f bench/w8a8.py ]; then python bench/w8a8.py; fi
if [ -f bench/minilm.py ]; then python bench/minilm.py; fi
