"""Issue 4: how well the fast (Fisher) cross terms agree with the exact ones, on a random sample of layer pairs.

Builds the same candidates (COMQ at 2, 4 and 8 bits, bias correction, shrinkage) and held-out oracle as
`onnxq --avg-bits`, measures every single-layer loss and output change, then the exact cross term
(L(a, b) - L(a) - L(b) + L(float)) / 2 of ``--pairs`` random pairs of different layers, and compares them with
the Fisher estimate of the same entries. Writes bench/results/clado_agreement_<model>.json.

    python bench/clado_agreement.py [--model squeezenet1.1] [--pairs 300] [--samples 128]
"""

from __future__ import annotations

import json

import click
import numpy as np
from common import CALIB, MODELS, RESULTS, model_path, require_shared
from methods import calibration_stats
from scipy.stats import pearsonr, spearmanr

from onnxq.allocation.oracle import LossOracle
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.sources import model_inputs
from onnxq.graph.layers import find_layers
from onnxq.graph.loading import load_model_and_layout
from onnxq.graph.prepare import prepare
from onnxq.passes import clado
from onnxq.pipeline import Options, collect_stats, oracle_feeds, round_candidates, with_bias_slots


@click.command()
@click.option("--model", "name", default="squeezenet1.1")
@click.option("--pairs", default=300, help="Random pairs of (layer, width) candidates measured exactly.")
@click.option("--samples", default=128, help="Held-out calibration samples the losses are measured on.")
@click.option("--bits", default="2,4,8")
def main(name: str, pairs: int, samples: int, bits: str) -> None:
    require_shared()
    stats_path, _ = calibration_stats(name, 256)
    options = Options(method="comq", stats=stats_path, preprocessing=MODELS[name], clado_samples=samples)
    model = prepare(load_model_and_layout(model_path(name))[0])
    layers, _ = find_layers(model)
    data = CalibrationSet(CALIB, model_inputs(model), MODELS[name], options.batch_size, options.calib_size,
                          held_out=samples)
    stats = collect_stats(model, layers, data, options, None)
    model, slots = with_bias_slots(model, layers, options)
    widths = tuple(int(b) for b in bits.split(","))
    rounded = round_candidates(model, layers, stats, {layer.name: widths for layer in layers}, options, None, slots)
    oracle = LossOracle(model, layers, oracle_feeds(data, samples), slots=slots)
    cands = clado.Candidates.uniform(widths, np.ones((len(layers), len(widths))))
    tensors = {(i, b): oracle.replacement(layer, rounded[(layer.name, b)][0])
               for i, layer in enumerate(layers) for b in widths}
    reference = oracle.loss_of_outputs(oracle.reference)
    single, deltas = {}, {}
    with click.progressbar(list(tensors), label="single-layer runs") as keys:
        for key in keys:
            outputs = oracle.outputs(tensors[key])
            single[key] = oracle.loss_of_outputs(outputs) - reference
            deltas[key] = (outputs - oracle.reference).astype(np.float32)
    fast = clado.fisher_sensitivity(cands, deltas, oracle.probabilities)
    rng = np.random.default_rng(0)
    keys = list(tensors)
    chosen = set()
    while len(chosen) < pairs:
        a, b = sorted(rng.choice(len(keys), 2, replace=False))
        if keys[a][0] != keys[b][0]:
            chosen.add((a, b))
    exact, estimate = [], []
    with click.progressbar(sorted(chosen), label="pair runs") as todo:
        for a, b in todo:
            joint = oracle.loss({**tensors[keys[a]], **tensors[keys[b]]}) - reference
            exact.append(0.5 * (joint - single[keys[a]] - single[keys[b]]))
            estimate.append(fast[cands.index(*keys[a]), cands.index(*keys[b])])
    exact, estimate = np.array(exact), np.array(estimate)
    diag_exact = np.array([single[k] for k in keys])
    diag_fisher = np.array([fast[cands.index(*k), cands.index(*k)] for k in keys])
    result = {
        "model": name, "pairs": pairs, "samples": len(oracle.reference), "bits": widths,
        "cross_pearson": float(pearsonr(exact, estimate)[0]), "cross_spearman": float(spearmanr(exact, estimate)[0]),
        "cross_sign_agreement": float(np.mean(np.sign(exact) == np.sign(estimate))),
        "cross_exact_mean_abs": float(np.abs(exact).mean()), "cross_fisher_mean_abs": float(np.abs(estimate).mean()),
        "diag_mean": float(diag_exact.mean()),
        "diag_fisher_pearson": float(pearsonr(diag_exact, diag_fisher)[0]),
        "cross_over_diag": float(np.abs(exact).mean() / diag_exact.mean()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"clado_agreement_{name}.json").write_text(json.dumps(result, indent=1))
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
