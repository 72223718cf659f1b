"""Keep padding tokens out of the calibration statistics of transformer graphs that take an attention mask.

A model input is taken as the attention mask when it is an integer (or bool) 2-D input whose name contains
"mask" (one with "att" in it preferred, e.g. ``attention_mask``). A layer input whose leading two dimensions
equal the mask's (batch, tokens) keeps only the rows of real tokens (mask != 0); any other layer input (a
Conv's, a Gemm's flattened rows, a per-head tensor) is left whole.
"""

from __future__ import annotations

import numpy as np

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
