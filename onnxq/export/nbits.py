"""Write 4-bit MatMul weights as onnxruntime's ``com.microsoft.MatMulNBits`` (weight-only, packed blocks).

The layout is the one onnxruntime's ``MatMulNBitsQuantizer`` writes (QOperator format):

* ``B``: uint8 (N, n_blocks, block_size / 2). Codes are unsigned (onnxq's signed code + 8), packed two per
  byte along K, the first in the low nibble. A fan-in the block does not divide is padded with zero-point
  codes, which dequantize to 0.
* ``scales``: float (N, n_blocks).
* ``zero_points``: uint4 packed the same way, (N, ceil(n_blocks / 2)); left out for symmetric grids, where
  onnxruntime's default 8 is exact.

A per-channel grid is one block per output channel: block_size is the next power of two >= K (at least 16).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel
from onnxq.passes import QuantWeight

DOMAIN = "com.microsoft"
MIN_BLOCK = 16  # MatMulNBits' block_size is a power of two, at least 16
OFFSET = 8  # signed 4-bit code + 8 = the unsigned code MatMulNBits stores


def nbits_block_size(qw: QuantWeight) -> int | None:
    """The MatMulNBits block size for a 4-bit weight, or None when its grid cannot be written that way."""
    if qw.grid.storage_bits != 4:
        return None
    block = qw.grid.block_size
    if block is None:
        return max(MIN_BLOCK, 1 << (qw.codes.shape[1] - 1).bit_length())
    return block if block >= MIN_BLOCK and block & (block - 1) == 0 else None


def supports_nbits(layer: Layer, qw: QuantWeight) -> bool:
    """A MatMul with a 2-D weight and a 4-bit (or 3-bit) grid that MatMulNBits can hold."""
    return layer.op_type == "MatMul" and len(layer.shape) == 2 and nbits_block_size(qw) is not None


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack values in [0, 15] two per byte along the last axis (odd length: padded with 0), low nibble first."""
    values = values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_uint4(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_uint4`: the first ``count`` values along the last axis."""
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def packed_tensors(qw: QuantWeight, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B (N, n_blocks, block/2), scales (N, n_blocks) and packed zero points (N, ceil(n_blocks/2))."""
    n, k = qw.codes.shape
    blocks = -(-k // block)
    zero_point = qw.zero_point.reshape(n, blocks).astype(np.int16) + OFFSET
    codes = qw.codes.astype(np.int16) + OFFSET
    padding = np.repeat(zero_point[:, -1:], blocks * block - k, axis=1)
    B = pack_uint4(np.concatenate([codes, padding], axis=1).reshape(n, blocks, block))
    return B, qw.scale.reshape(n, blocks).astype(np.float32), pack_uint4(zero_point)


def dequantize_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """The (N, K) float weight a MatMulNBits node computes with, from its initializers (for checks)."""
    n, blocks, blob = B.shape
    codes = unpack_uint4(B, 2 * blob).reshape(n, -1)[:, :k].astype(np.float32)
    zp = np.full((n, blocks), OFFSET, np.float32) if zero_points is None else unpack_uint4(zero_points, blocks)
    index = np.arange(k) // (2 * blob)
    return (codes - zp[:, index].astype(np.float32)) * scales[:, index]


def replace_with_nbits(graph: GraphModel, layer: Layer, qw: QuantWeight, accuracy_level: int = 0) -> None:
    """Edit ``graph``: swap a MatMul and its float weight for a MatMulNBits node (same place, same output) and
    its packed initializers (named as onnxruntime names them).

    ``accuracy_level`` is the node's attribute: 0 computes in float as the file says, 4 lets onnxruntime
    quantize the activations to int8 (faster, slightly less exact)."""
    node = graph.node(layer.name)
    block = nbits_block_size(qw)
    B, scales, zero_points = packed_tensors(qw, block)
    name = layer.weight
    arrays = {f"{name}_Q4": B, f"{name}_scales": scales}
    if not qw.grid.symmetric:
        arrays[f"{name}_zero_points"] = zero_points
    tensors = [graph.add_constant(numpy_helper.from_array(array, key)) for key, array in arrays.items()]
    k, n = layer.shape
    new = graph.make_node("MatMulNBits", f"{node.name}_Q4", [node.inputs[0], *tensors], list(node.outputs),
                          domain=DOMAIN, K=k, N=n, bits=4, block_size=block,
                          **({"accuracy_level": accuracy_level} if accuracy_level else {}))
    graph.place([new], before=node)
    graph.remove_node(node)
    graph.drop_unused([name])
    graph.set_opset(DOMAIN, 1)
