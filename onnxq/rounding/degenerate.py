"""Checks on what the rounding passes are given, per layer: non-finite numbers stop the run with the layer's
name; inputs the calibration data does not vary are reported (the passes round them for weight MSE, see
``passes/gram.py``): a warning for layers that see nothing, an info line for partly dead ones."""

from __future__ import annotations

import logging

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.passes.gram import unseen_inputs
from onnxq.rounding.pool import RoundingTask

log = logging.getLogger("onnxq")
NAMED = 4  # layers named in one message; the rest are counted


def layer_name(task: RoundingTask) -> str:
    """The layer a task rounds (keys are the name, or (name, bits) for candidate widths)."""
    return str(task.key[0] if isinstance(task.key, tuple) else task.key)


def first_per_layer(tasks: list[RoundingTask]) -> dict[str, RoundingTask]:
    """One task per layer (the candidate widths of a layer share its weight and Gram matrix)."""
    found: dict[str, RoundingTask] = {}
    for task in tasks:
        found.setdefault(layer_name(task), task)
    return found


def named(items: list[str]) -> str:
    """The first few items, and how many more."""
    more = len(items) - NAMED
    return ", ".join(items[:NAMED]) + (f" and {more} more" if more > 0 else "")


def check_rounding_inputs(tasks: list[RoundingTask]) -> None:
    """Refuse layers whose weight or input statistics hold NaN or Inf (one error naming them all), and report
    the layers with inputs the calibration data does not vary (constant or always zero)."""
    layers = first_per_layer(tasks)
    bad = [f"{name} ({what})" for name, task in layers.items() if (what := non_finite(task))]
    if bad:
        raise OnnxqError(f"{len(bad)} layer(s) cannot be rounded: {named(bad)}; check that the float model gives "
                         "finite outputs on the calibration data, or keep the layers in float with "
                         "--nodes_to_exclude")
    blind, partial = [], []
    for name, task in layers.items():
        count, total = unseen_inputs(task.H), task.H.size // task.H.shape[-1]
        if count:
            (blind if count == total else partial).append(f"{name} ({count} of {total})")
    if blind:
        log.warning("the calibration data does not vary any input of %d layer(s): %s; they are rounded to nearest "
                    "(weight MSE), as without data; give more, and more varied, calibration samples",
                    len(blind), named(blind))
    if partial:  # dead channels (a ReLU that never fires) are common in trained models: not worth a warning
        log.info("inputs the calibration data does not vary, rounded to nearest: %s", named(partial))


def non_finite(task: RoundingTask) -> str | None:
    """What is not finite about a task, or None."""
    if not np.isfinite(task.H).all():  # the Gram sums cannot overflow (passes/gram.py): the values are Inf or NaN
        return "its input is Inf or NaN on the calibration data"
    if not np.isfinite(task.W).all():
        return "its weight holds NaN or Inf"
    return None
