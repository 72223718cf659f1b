#!/usr/bin/env bash
# Regenerate every table and plot the README quotes (needs ../shared or $ONNXQ_SHARED; hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
python bench/peers.py  # needs: pip install -e '.[peers]'
python bench/demo_calib.py
python bench/pass_speed.py --bits 4 --repeat 3 --quality | tee bench/results/pass_speed.txt
python bench/methods.py
python bench/methods.py --bits 4,3 --methods gptq,comq --no-bias-correction --tag methods_no_bias_correction
python bench/sequential.py --models squeezenet1.1,mobilenet_v1_0.75_224
python bench/sequential.py --models efficientnet_lite0 --bits 4 --tag sequential_effnet
python bench/calib_subsets.py
python bench/mixed_precision.py --models squeezenet1.1 --tag mixed_squeezenet
python bench/mixed_precision.py --models mobilenet_v1_0.75_224 --tag mixed_mobilenet
python bench/mixed_precision.py --models efficientnet_lite0 --tag mixed_efficientnet
python bench/mixed_precision.py --models squeezenet1.1 --verify-samples 0 --tag mixed_squeezenet_no_verification
python bench/mixed_precision.py --models squeezenet1.1 --sequential --tag mixed_squeezenet_sequential
python bench/mixed_precision.py --models mobilenet_v1_0.75_224 --sequential --tag mixed_mobilenet_sequential
python bench/mixed_precision.py --models mobilenet_v1_0.75_224 --sequential --budgets 3,4 --tag mixed_mobilenet_sequential_verified
python bench/clado_agreement.py --model squeezenet1.1 --pairs 300
{ python bench/one_layer.py --model mobilenet_v1_0.75_224 --layer conv_preds --bits 2
  python bench/one_layer.py --model mobilenet_v1_0.75_224 --layer conv_preds --bits 2 --no-shrinkage
  python bench/one_layer.py --model squeezenet1.1 --layer conv10 --bits 2; } | tee bench/results/one_layer.txt
python bench/calib_memory.py
python bench/speed.py  # needs: pip install -e '.[bench,peers]'; alone on a quiet machine (ratios to onnxruntime)
python bench/w8a8.py
python bench/prefer.py
python bench/big_model.py  # writes a 2.4 GB model to a temporary folder; ~15 GB peak memory
python bench/minilm.py  # needs: pip install -e '.[bench]'
python bench/report_demo.py
python bench/clado_exact.py --no-scaling  # needs: pip install -e '.[distributed]'; ~50 min with 2 workers
