"""Keep padding tokens out of the calibration statistics of transformer graphs that take an attention mask.

A model input is taken as the attention mask when it is an integer (or bool) 2-D input whose name contains
"mask" (one with "att" in it preferred, e.g. ``attention_mask``). A layer input whose leading two dimensions
equal the mask's (batch, tokens) keeps only the rows of real tokens (mask != 0); any other layer input (a
Conv's, a Gemm's flattened rows, a per-head tensor) is left whole. Because padding rows never reach the
statistics, samples of different lengths can share one onnxruntime run: ``pad_tokens`` pads them to the
batch's longest (mask 0) instead of running one batch per length, and ``by_length`` first sorts them by
length within windows of a few batches, so a batch pads little (on MiniLM's sentences 1.36x the real tokens
instead of 2.56x in file order; the forward passes are most of calibration's time).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

LENGTH_WINDOW = 8  # batches' worth of token samples sorted by length together

if TYPE_CHECKING:  # sources.py imports this module to batch token feeds
    from onnxq.data.sources import Feed, InputSpec
    from onnxq.graph.layers import Layer


def attention_mask_name(inputs: list[InputSpec]) -> str | None:
    """The model input that masks padding tokens, or None."""
    found = [s.name for s in inputs if s.dtype.kind in "iub" and len(s.shape) == 2 and "mask" in s.name.lower()]
    preferred = [name for name in found if "att" in name.lower()]
    return (preferred or found or [None])[0]


def batch_mask(feed: Feed, name: str | None) -> np.ndarray | None:
    """The (batch, tokens) boolean mask of real tokens in one batch, or None."""
    return None if name is None or name not in feed else np.asarray(feed[name]) != 0


def token_rows(x: np.ndarray, layer: Layer, mask: np.ndarray | None) -> np.ndarray:
    """The layer input without its padding rows when its leading dims are the mask's; otherwise unchanged."""
    if mask is None or layer.op_type == "Conv" or x.ndim < 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask]


def token_inputs(inputs: list[InputSpec], mask_name: str | None) -> list[str]:
    """The inputs laid out (batch, tokens, ...) with a dynamic token axis, the mask included; [] without a mask."""
    if mask_name is None:
        return []
    return [s.name for s in inputs if len(s.shape) >= 2 and s.shape[1] is None]


def can_pad(a: Feed, b: Feed, mask_name: str, tokens: list[str]) -> bool:
    """Whether two feeds differ only in their token count: every token input has the mask's token count and
    every other dimension matches."""
    def fits(feed: Feed) -> bool:
        count = np.shape(feed[mask_name])[1]
        return all(np.ndim(feed[name]) >= 2 and np.shape(feed[name])[1] == count for name in tokens)

    if mask_name not in tokens or not (fits(a) and fits(b)):
        return False
    return all(np.shape(a[k])[2:] == np.shape(b[k])[2:] if k in tokens else np.shape(a[k])[1:] == np.shape(b[k])[1:]
               for k in a)


def pad_tokens(feeds: list[Feed], tokens: list[str]) -> list[Feed]:
    """The feeds with every token input zero-padded on the right to the longest (the mask's zeros mark the
    padding, so the statistics drop those rows)."""
    longest = max(np.shape(feed[tokens[0]])[1] for feed in feeds)
    padded = []
    for feed in feeds:
        extra = longest - np.shape(feed[tokens[0]])[1]
        padded.append(feed if not extra else {
            k: np.pad(v, [(0, 0), (0, extra)] + [(0, 0)] * (v.ndim - 2)) if k in tokens else v
            for k, v in feed.items()})
    return padded


def by_length(feeds: Iterable[tuple[Feed, int]], mask_name: str, window: int,
              boundary: int | None) -> Iterator[tuple[Feed, int]]:
    """(feed, samples) pairs reordered by token count (stable) within windows of ``window`` samples.

    No window spans the ``boundary``-th sample (a feed that straddles it goes alone), so the first
    ``boundary`` samples stay the same set: only which samples share a batch changes.
    """
    pending: list[tuple[Feed, int]] = []
    count = taken = 0

    def flush() -> list[tuple[Feed, int]]:
        nonlocal count
        ordered = sorted(pending, key=lambda item: np.shape(item[0][mask_name])[1])
        pending.clear()
        count = 0
        return ordered

    for feed, rows in feeds:
        crosses = boundary is not None and taken < boundary < taken + rows
        if crosses:
            yield from flush()
        pending.append((feed, rows))
        count += rows
        taken += rows
        if crosses or count >= window or taken == boundary:
            yield from flush()
    yield from flush()
