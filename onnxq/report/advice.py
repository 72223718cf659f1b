"""Warnings that end a run with a concrete next step: the check on held-out samples is poor, or the calibration set
is too small for the model's layers.

Both are cheap reads of what the run already measured (the output check, per-layer relative errors, the Gram
matrices' sizes and rows), so they cost nothing; they are logged at warning level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from onnxq.config import Config

log = logging.getLogger("onnxq")
POOR_SQNR_DB = 15.0  # output SQNR below this: top-1 agreement with the float model typically drops under ~80 %
POOR_AGREEMENT = 0.75  # top-1 agreement with the float model below this on the held-out check
ROWS_PER_INPUT = 10  # rows per Gram dimension for a Gram estimate that rounding does not overfit
MIN_SAMPLES = 32  # fewer calibration samples than this is thin for any model
DEFAULT_CALIB_SIZE = 256  # what --calib-size gives by default (onnxq.config)
OUTLIER_FACTOR = 3.0  # a layer "loses most" when its relative error is this many times the median
SHOWN = 3  # layer names quoted in a warning


@dataclass(frozen=True)
class GramSize:
    """One layer's Gram matrix as calibration saw it: its dimension (inputs per group) and rows per sample."""

    name: str
    dimension: int
    rows_per_sample: float


def samples_needed(grams: Iterable[GramSize], shrinkage: bool = True) -> tuple[int, GramSize | None]:
    """Calibration samples the model needs (at least MIN_SAMPLES) and the layer that sets it: ROWS_PER_INPUT rows
    per Gram dimension for layers that see several rows per sample; layers that see one row per sample (after
    global pooling) need a full-rank Gram, which shrinkage makes up for, so they count only without it."""
    needed, worst = MIN_SAMPLES, None
    for gram in grams:
        if gram.rows_per_sample <= 0:
            continue
        if gram.rows_per_sample > 1:
            count = math.ceil(ROWS_PER_INPUT * gram.dimension / gram.rows_per_sample)
        elif not shrinkage:
            count = gram.dimension
        else:
            continue
        if count > needed:
            needed, worst = count, gram
    return needed, worst


def calibration_size_warning(samples: int, grams: Iterable[GramSize], shrinkage: bool = True) -> str | None:
    """A warning when ``samples`` calibration samples are too few for the model, saying how many it needs."""
    if samples <= 0:
        return None
    needed, worst = samples_needed(grams, shrinkage)
    if samples >= needed:
        return None
    why = (f" (layer {worst.name} has {worst.dimension} inputs and gets {worst.rows_per_sample:.0f} rows per "
           f"sample; its Gram matrix needs about {ROWS_PER_INPUT} rows per input)") if worst else ""
    return (f"calibrated on {samples} sample{'s' if samples != 1 else ''}, and this model needs about {needed}"
            f"{why}: rounding fits those few samples and the model generalises worse; give at least {needed} "
            f"(the default --calib-size is {DEFAULT_CALIB_SIZE}, from a folder of that many images or more)")


@dataclass(frozen=True)
class RunFacts:
    """What the advice needs to know about the run besides its measured figures."""

    method: str
    sequential: bool
    budget: bool
    first_last_bits: int | None
    edge_layers: tuple[str, ...]
    samples: int
    samples_needed: int


def quality_warning(sqnr_db: float | None, agreement: float | None, held_out: bool,
                    layers: list[tuple[str, int, float]], facts: RunFacts) -> str | None:
    """A warning with next steps when the check of the written model is poor. ``layers``: (name, bits,
    relative error) per quantized layer."""
    poor_sqnr = sqnr_db is not None and sqnr_db < POOR_SQNR_DB
    poor_agreement = agreement is not None and agreement < POOR_AGREEMENT
    if not (poor_sqnr or poor_agreement) or not layers:
        return None
    figures = ", ".join(part for part in (f"output SQNR {sqnr_db:.1f} dB" if sqnr_db is not None else "",
                                          f"top-1 agreement {100 * agreement:.0f} %" if agreement is not None else "")
                        if part)
    where = "held-out samples" if held_out else "a calibration batch, which flatters"
    worst = losing_most(layers)
    steps = next_steps(layers, worst, facts)
    verb = "loses" if len(worst) == 1 else "lose"
    lead = (f"{len(worst)} of {len(layers)} layers {verb} most ({', '.join(worst[:SHOWN])}"
            f"{', ...' if len(worst) > SHOWN else ''}): " if worst else "")
    return f"the quantized model is far from the float one ({figures} on {where}); {lead}try {' / '.join(steps)}"


def losing_most(layers: list[tuple[str, int, float]]) -> list[str]:
    """Layers whose relative error is OUTLIER_FACTOR times the median or more, worst first."""
    errors = np.array([error for _, _, error in layers], np.float64)
    median = float(np.median(errors))
    ranked = sorted(layers, key=lambda item: -item[2])
    return [name for name, _, error in ranked if median > 0 and error >= OUTLIER_FACTOR * median]


def next_steps(layers: list[tuple[str, int, float]], worst: list[str], facts: RunFacts) -> list[str]:
    """The flags most likely to help, most effective first."""
    widths = {name: bits for name, bits, _ in layers}
    narrowest = min(widths.values())
    steps = []
    edges_narrow = [name for name in facts.edge_layers if widths.get(name, 8) < 8]
    if facts.first_last_bits is None and edges_narrow and (set(worst) & set(edges_narrow) or not worst):
        steps.append("--first-last-bits 8")
    if not facts.budget and narrowest < 4:
        steps.append(f"--bits {narrowest + 1 if narrowest < 3 else 4}")
    if not facts.budget:
        average = sum(widths.values()) / len(widths)
        steps.append(f"a budget such as --avg-bits {min(8.0, round(average + 0.5, 1)):g} (CLADO widens the "
                     "layers that lose most)")
    if facts.method == "rtn":
        steps.append("--method comq")
    if not facts.sequential:
        steps.append("--sequential")
    if facts.samples < max(facts.samples_needed, DEFAULT_CALIB_SIZE):
        steps.append(f"more calibration samples (now {facts.samples})")
    return steps


def advise(result: object, stats: dict, config: Config, sequential: bool, edge_layers: list[str]) -> list[str]:
    """The run's warnings (logged, and returned): calibration set size, then the check. ``result`` is the
    pipeline's QuantizationResult, ``stats`` its LayerStats by layer name, ``edge_layers`` the layers
    ``--first-last-bits`` widens."""
    grams = [GramSize(name, s.gram.shape[-1], s.rows / s.samples) for name, s in stats.items() if s.samples]
    samples = result.calibration_samples
    shrinkage = config.rounding.shrinkage
    needed, _ = samples_needed(grams, shrinkage)
    facts = RunFacts(config.rounding.method, sequential, config.mixed is not None, config.layers.first_last_bits,
                     tuple(edge_layers), samples, needed)
    rows = [(r.name, r.bits, r.relative_error) for r in result.layers]
    messages = [m for m in (calibration_size_warning(samples, grams, shrinkage),
                            quality_warning(result.output_sqnr_db, result.top1_agreement, result.check_held_out,
                                            rows, facts)) if m]
    for message in messages:
        log.warning("%s", message)
    return messages
