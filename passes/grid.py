"""Integer grids, quantized weights and the layer objective shared by every rounding pass.

A pass sees a layer as a matrix ``W`` (out_channels x fan_in) and the Gram matrix of its inputs
``H`` with shape (groups, fan_in, fan_in): output rows ``[g*out/G, (g+1)*out/G)`` read the inputs
whose Gram matrix is ``H[g]`` (G = 1 for a plain layer, G = out for a depthwise Conv).
Codes are signed integers in the range the ONNX container holds (3-bit codes live in INT4 as [-4, 3]).

Scales and zero points are per output channel, shape (out,), or with ``Grid.block_size`` per block of
``block_size`` consecutive inputs, shape (out, n_blocks) with n_blocks = ceil(fan_in / block_size): when
the block does not divide the fan-in the last block is shorter (as ONNX's blocked DequantizeLinear reads it;
MatMulNBits export pads it with zero-point codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    """A uniform integer grid of ``bits`` bits, symmetric (zero point 0) or not, per channel or per block."""

    bits: int
    symmetric: bool = False
    block_size: int | None = None  # None: one scale per output channel; else one per block of inputs

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block size must be positive, not {self.block_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def storage_bits(self) -> int:
        """Bits per code in the file: ONNX has INT2, INT4 and INT8 but no INT3."""
        return {2: 2, 3: 4, 4: 4, 8: 8}[self.bits]


@dataclass
class QuantWeight:
    """Integer codes with a per-channel or per-block scale and zero point: ``Q = (codes - zp) * scale``."""

    codes: np.ndarray  # int8, out x fan_in, every value in [grid.qmin, grid.qmax]
    scale: np.ndarray  # float32, (out,) or, blocked, (out, n_blocks)
    zero_point: np.ndarray  # int8, shaped as scale, in [grid.qmin, grid.qmax]
    grid: Grid
    bias_shift: np.ndarray | None = None  # (out,) output error mean (W - Q) mu, added to the bias on export

    def dequantize(self) -> np.ndarray:
        """The float weight matrix the exported model computes with (float32, as onnxruntime does)."""
        d = self.codes.shape[1]
        centred = self.codes.astype(np.float32) - per_weight(self.zero_point.astype(np.float32), d, self.grid)
        return centred * per_weight(self.scale.astype(np.float32), d, self.grid)


def n_blocks(fan_in: int, grid: Grid) -> int:
    """Scales per output row: 1 per channel, ceil(fan_in / block_size) blocked (the last block shorter)."""
    return 1 if grid.block_size is None else -(-fan_in // grid.block_size)


def block_index(fan_in: int, grid: Grid) -> np.ndarray:
    """The block of each input coordinate (all 0 per channel)."""
    return np.arange(fan_in) // (grid.block_size or max(fan_in, 1))


def per_weight(x: np.ndarray, fan_in: int, grid: Grid) -> np.ndarray:
    """A per-row (out,) or per-block (out, n_blocks) quantity, broadcastable against an out x fan_in weight."""
    return x[:, None] if x.ndim == 1 else x[:, block_index(fan_in, grid)]


def block_reduce(X: np.ndarray, grid: Grid, ufunc: np.ufunc = np.add) -> np.ndarray:
    """Reduce every row of X over each block: shape (out,) per channel, (out, n_blocks) blocked."""
    if grid.block_size is None:
        return ufunc.reduce(X, axis=1)
    return ufunc.reduceat(X, np.arange(0, X.shape[1], grid.block_size), axis=1)


def group_of_rows(out_channels: int, groups: int) -> np.ndarray:
    """Index of the Gram matrix that each output row reads."""
    if out_channels % groups:
        raise ValueError(f"{out_channels} output channels do not split into {groups} groups")
    return np.repeat(np.arange(groups), out_channels // groups)


def as_grouped(H: np.ndarray) -> np.ndarray:
    """Accept a single Gram matrix (d x d) or a stack (G x d x d); return the stack."""
    return H[None] if H.ndim == 2 else H


def row_quadratic(E: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Per-row ``e_i^T H_{g(i)} e_i`` for E (out x d) and grouped H (G x d x d)."""
    H = as_grouped(H)
    G = H.shape[0]
    Eg = E.reshape(G, -1, E.shape[1]).astype(np.float64)
    return np.einsum("grj,grj->gr", np.matmul(Eg, H), Eg).reshape(-1)  # one GEMM (einsum's own path copies more)


def objective(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """The layer reconstruction error ``tr((W-Q) H (W-Q)^T)``: what every pass minimises."""
    return float(row_quadratic(W - Q, H).sum())


def relative_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """``tr((W-Q) H (W-Q)^T) / tr(W H W^T)``: 0 is exact, 1 is as bad as zeroing the layer.

    Computed on W and Q divided by max |W| (the ratio does not change), so huge weights cannot overflow it.
    When the data sees none of the layer's inputs (H = 0), the passes minimised the weight MSE, and that is
    what is reported (``||W-Q||^2 / ||W||^2``). NaN when W, Q or H is not finite: never a silent 0.
    """
    W, Q, H = np.asarray(W, dtype=np.float64), np.asarray(Q, dtype=np.float64), np.asarray(H, dtype=np.float64)
    if not (np.isfinite(W).all() and np.isfinite(Q).all() and np.isfinite(H).all()):
        return float("nan")
    top = float(np.abs(W).max(initial=0.0))
    if top == 0.0:
        return 0.0 if not Q.any() else float("inf")
    W, Q = W / top, Q / top
    if not H.any():
        H = np.eye(W.shape[1])
    reference = float(row_quadratic(W, H).sum())
    error = objective(W, Q, H)
    return error / reference if reference > 0 else (0.0 if error <= 0 else float("inf"))


def minmax_params(lo: np.ndarray, hi: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map per-channel (or per-block) ranges [lo, hi], widened to contain 0, onto the grid."""
    lo = np.minimum(lo, 0.0).astype(np.float64)
    hi = np.maximum(hi, 0.0).astype(np.float64)
    if grid.symmetric:
        absmax = np.maximum(-lo, hi)
        scale = absmax / grid.qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (grid.qmax - grid.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(grid.qmin - np.round(lo / safe), grid.qmin, grid.qmax)
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero channel: any scale is exact with code = zp
    return scale.astype(np.float32), zero_point.astype(np.int8)


def round_to_grid(W: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, grid: Grid) -> np.ndarray:
    """Nearest codes for W on the given per-channel or per-block grid (round half to even, then clip)."""
    d = W.shape[1]
    codes = np.round(W / per_weight(scale.astype(np.float64), d, grid)) + per_weight(zero_point, d, grid)
    return np.clip(codes, grid.qmin, grid.qmax).astype(np.int8)


def quant_weight(W: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, grid: Grid) -> QuantWeight:
    """Round W to the nearest codes on a given grid."""
    return QuantWeight(round_to_grid(W, scale, zero_point, grid), scale, zero_point, grid)
