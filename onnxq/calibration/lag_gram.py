"""Depthwise Convs on large maps: the Gram matrix from lagged dot products of (phase) images, no im2col.

Entry (t, u) of a depthwise layer's Gram matrix sums ``x[s*i + d*t - p] * x[s*i + d*u - p]`` over the output
pixels ``i`` (per axis: stride s, dilation d, begin pad p). Split each tap's offset ``d*t - p = s*q_t + r_t``:
tap t reads the phase image ``X_r = x[r::s]`` (the polyphase decomposition turns a stride-s Conv into stride-1
pieces; for s = 1 the phase is the image) at ``i + q_t``. With ``m = i + q_t`` the entry is a sum of the lagged
product map ``X_a[m] X_b[m + q_u - q_t]`` over the rectangle ``m in out + q_t``, and that map depends on the tap
pair only through (phase a, phase b, lag): a 3x3 stride-1 kernel has 13 maps where its im2col GEMM needs 45-81
products per pixel. A map is summed per image row with BLAS dots (all rows at once); the rectangle then drops a
few whole rows (those dots) and a few edge columns (dots along those columns, over all rows) and adds back their
crossings. Phase images are stored rows outermost, ``(rows, samples, columns)``, framed by zero rows (above, below)
and columns (right) as wide as the largest lag, so that a lag is one flat shift that pairs values of the same sample
only (a shift left of a row lands in the previous sample's zero columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

from onnxq.calibration.unfold import Window


def _einsum_dot(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b, out=out)


dot_last = getattr(np, "vecdot", _einsum_dot)  # dot products along the last axis (np.vecdot needs numpy >= 2)

LAG_MIN_PIXELS = 100  # maps from 10 x 10 up (up to 8 x 8 image_gram.py folds the image Gram matrix; between: tiles)
LAG_MAX_TAPS = 25  # kernels up to 5x5 (41 maps; 7x7 would need 85)
LAG_MAX_STRIDE = 2  # stride 2: four phase images (a 3x3 kernel has 34 maps, each a quarter of the image)
LAG_CHUNK_ELEMENTS = 1 << 18  # phase-image values held at once (1 MB: the dots run ~2x faster within a 2 MB L2)


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a depthwise Conv: where each tap reads, as (phase, shift) of the phase images."""

    kernel: int
    stride: int
    dilation: int
    pad: int
    size: int
    out: int

    def taps(self) -> list[tuple[int, int]]:
        """``(phase r, shift q)`` per tap: output pixel i reads ``x[r::s][i + q]``."""
        return [(r, q) for q, r in (divmod(self.dilation * t - self.pad, self.stride) for t in range(self.kernel))]

    def length(self, phase: int) -> int:
        return len(range(phase, self.size, self.stride))

    def reads(self) -> np.ndarray:
        """(taps, taps): whether taps t and u both read the image at some output pixel; where not, the entry is
        exactly zero, which the signed sums would only approximate to rounding."""
        spans = [(max(-q, 0), min(self.length(r) - q, self.out)) for r, q in self.taps()]
        return np.array([[max(a[0], b[0]) < min(a[1], b[1]) for b in spans] for a in spans])

    def tap_mask(self) -> np.ndarray:
        """(size, taps) float64: 1 where tap t's rectangle ``[q, q + out)`` of its phase image reads the image."""
        mask = np.zeros((self.size, self.kernel))
        for t, (r, q) in enumerate(self.taps()):
            mask[r + self.stride * np.arange(max(q, 0), min(q + self.out, self.length(r))), t] = 1
        return mask

    def dropped(self) -> list[int]:
        """Phase-image positions some tap's rectangle ``[q, q + out)`` leaves out: the edge rows or columns."""
        longest = max(self.length(r) for r, _ in self.taps())
        return sorted({m for _, q in self.taps() for m in range(longest) if not q <= m < q + self.out})


@dataclass(frozen=True)
class LagPlan:
    """The lagged maps of one geometry and the sparse sums that turn their features into Gram entries."""

    phases: tuple[tuple[int, int], ...]  # (row phase, column phase) of every phase image read
    shapes: tuple[tuple[int, int], ...]  # their (height, width)
    margin: tuple[int, int]  # zero rows above and below, zero columns on the right: the largest lag
    lags: tuple[tuple[int, int, int, int], ...]  # (phase a, phase b, row lag, column lag)
    dropped: tuple[np.ndarray, np.ndarray]  # the rows and the columns some rectangle leaves out
    edge_columns: np.ndarray  # image columns the column dots read (dropped columns, shifted by every lag)
    gram_terms: sparse.csr_matrix  # (lags * features, taps * taps): each entry's signed sum of features


@lru_cache(maxsize=64)
def lag_plan(rows: Axis, cols: Axis, symmetric: bool = True) -> LagPlan:
    """The lagged maps of a depthwise window (module docstring), built once per geometry. ``symmetric``: for a
    Gram matrix, where entries (t, u) and (u, t) read one map; else (the cross products of two images, paired
    taps of the first and the second) every tap pair has the map of its own direction."""
    taps = [(ry, qy, rx, qx) for ry, qy in rows.taps() for rx, qx in cols.taps()]
    phases = sorted({(ry, rx) for ry, _, rx, _ in taps})
    index = {phase: k for k, phase in enumerate(phases)}
    keys: dict[tuple[int, int, int, int], int] = {}
    pairs = []  # (lag, the tap whose rectangle the map is summed over) per Gram entry
    for ry, qy, rx, qx in taps:
        for uy, vy, ux, vx in taps:
            forward, backward = (index[ry, rx], index[uy, ux], vy - qy, vx - qx), (index[uy, ux], index[ry, rx],
                                                                                     qy - vy, qx - vx)
            key = min(forward, backward) if symmetric else forward  # a Gram: the same sum read from either side
            pairs.append((keys.setdefault(key, len(keys)), (qy, qx) if key == forward else (vy, vx)))
    lags = list(keys)
    dropped = (np.array(rows.dropped(), np.intp), np.array(cols.dropped(), np.intp))
    margin = (max(abs(lag[2]) for lag in lags), max(abs(lag[3]) for lag in lags))
    shifted = {int(m + lag[3]) for m in dropped[1] for lag in lags}
    gram_terms = term_matrix(pairs, len(keys), dropped, (rows.out, cols.out))
    reads = (rows.reads()[:, None, :, None] & cols.reads()[None, :, None, :]).reshape(len(taps), len(taps))
    gram_terms = gram_terms @ sparse.diags(reads.ravel().astype(np.float64))
    shapes = tuple((rows.length(ry), cols.length(rx)) for ry, rx in phases)
    edge_columns = np.array(sorted(shifted), np.intp)
    return LagPlan(tuple(phases), shapes, margin, tuple(lags), dropped, edge_columns, gram_terms.tocsr())


def term_matrix(entries: list[tuple[int, tuple[int, int]]], maps: int, dropped: tuple[np.ndarray, np.ndarray],
                out: tuple[int, int]) -> sparse.csr_matrix:
    """(maps * features, entries): the sum of map ``lag`` over the rectangle starting at ``corner`` (``out`` in
    size) by inclusion-exclusion: all rows, minus the dropped rows, minus the dropped columns, plus both."""
    drop_rows, drop_cols = dropped
    features = feature_count(dropped)
    rows, cols, signs = [], [], []
    for entry, (lag, (qy, qx)) in enumerate(entries):
        off_rows = np.nonzero((drop_rows < qy) | (drop_rows >= qy + out[0]))[0]
        off_cols = np.nonzero((drop_cols < qx) | (drop_cols >= qx + out[1]))[0]
        base = lag * features
        crossings = (off_rows[:, None] * len(drop_cols) + off_cols[None, :]).ravel()
        for where, sign in ((np.array([0]), 1.0), (1 + off_rows, -1.0), (1 + len(drop_rows) + off_cols, -1.0),
                            (1 + len(drop_rows) + len(drop_cols) + crossings, 1.0)):
            rows += list(base + where)
            cols += [entry] * len(where)
            signs += [sign] * len(where)
    return sparse.csr_matrix((signs, (rows, cols)), shape=(maps * features, len(entries)))


def feature_count(dropped: tuple[np.ndarray, np.ndarray]) -> int:
    """Sums kept per map: all rows, each dropped row, each dropped column, each crossing of the two."""
    return 1 + len(dropped[0]) + len(dropped[1]) + len(dropped[0]) * len(dropped[1])


def axes(shape: tuple[int, int], window: Window, pads: tuple[int, int], out: tuple[int, int]) -> tuple[Axis, Axis]:
    return tuple(Axis(k, s, d, p, size, o) for k, s, d, p, size, o in zip(
        window.kernel, window.strides, window.dilations, pads, shape, out, strict=True))


def fits(x: np.ndarray, conv: dict) -> bool:
    """Whether a depthwise layer's input (n, C, H, W) takes the lagged maps: 2-D maps of ``LAG_MIN_PIXELS`` or
    more, strides up to ``LAG_MAX_STRIDE``, up to ``LAG_MAX_TAPS`` taps. The kernel is exact for any geometry; with
    more taps or phases the maps outnumber the window tiles' products (gram.py)."""
    return (x.ndim == 4 and x.shape[2] * x.shape[3] >= LAG_MIN_PIXELS and max(conv["strides"]) <= LAG_MAX_STRIDE
            and int(np.prod(conv["kernel_shape"])) <= LAG_MAX_TAPS)


def add_lagged_cross(cross: np.ndarray, x: np.ndarray, y: np.ndarray, window: Window, pads: tuple[int, int],
                     out: tuple[int, int]) -> None:
    """Add the cross products (G, taps, taps), entry (t, u) the sum of tap t of ``x`` times tap u of ``y`` over the
    output pixels, for two batches of one depthwise Conv's unpadded input of the same shape (n, G, H, W): the
    lagged maps of x's phase images against y's (sequential rounding's quantized and float streams)."""
    rows, cols = axes(x.shape[2:], window, pads, out)
    plan = lag_plan(rows, cols, symmetric=False)
    cross += (lagged_features(plan, (rows.stride, cols.stride), x, y) @ plan.gram_terms).reshape(cross.shape)


def add_lagged_gram(gram: np.ndarray, row_sum: np.ndarray, x: np.ndarray, window: Window, pads: tuple[int, int],
                    out: tuple[int, int]) -> None:
    """Add a depthwise Conv's Gram matrices (G, taps, taps) and row sums (G, taps) for a batch of its unpadded input
    (n, G, H, W) with (top, left) padding and ``out`` output pixels (module docstring)."""
    rows, cols = axes(x.shape[2:], window, pads, out)
    plan = lag_plan(rows, cols)
    gram += (lagged_features(plan, (rows.stride, cols.stride), x) @ plan.gram_terms).reshape(gram.shape)
    row_sum += tap_sums(x, rows, cols)


def lagged_features(plan: LagPlan, strides: tuple[int, int], x: np.ndarray, y: np.ndarray | None = None
                    ) -> np.ndarray:
    """(channels, lags * features) float64 sums of every lagged map of ``x`` (n, C, H, W) against itself, or against
    ``y`` (the phase b of each map). The row dots stream the phase images in cache-sized chunks of channels; the
    edge terms (small products over the edge columns) run once for all channels afterwards: per chunk, which on a
    large map is a single channel, their dozens of small numpy calls cost as much as the dots."""
    frames = Frames(plan, x.shape[0])
    channels = x.shape[1]
    step = max(1, LAG_CHUNK_ELEMENTS // max(frames.per_channel, 1))
    dots = np.empty((channels, len(plan.lags), frames.height), np.float32)
    edges = frames.edge_arrays(channels)
    partner_edges = edges if y is None else frames.edge_arrays(channels)
    for start in range(0, channels, step):
        chunk = slice(start, min(start + step, channels))
        images = frames.fill(x[:, chunk], strides, edges, chunk)
        partner = images if y is None else frames.fill(y[:, chunk], strides, partner_edges, chunk, slot=1)
        frames.row_dots(images, partner, dots[chunk])
    return frames.assemble(dots, edges, partner_edges)


def tap_sums(x: np.ndarray, rows: Axis, cols: Axis) -> np.ndarray:
    """(G, taps) row sums: each tap's rectangle of its phase image, summed over the samples first, then over the
    columns and the rows of every tap's rectangle at once (products with 0/1 masks: one pass over the image)."""
    n, channels, height, width = x.shape
    image = np.ones(n, np.float32) @ x.reshape(n, -1)  # (G * H * W): a matrix-vector product, 2x faster than sum()
    per_column = image.reshape(-1, width) @ cols.tap_mask().astype(np.float32)  # (G * H, column taps)
    per_column = per_column.reshape(channels, height, -1).astype(np.float64)
    return np.matmul(rows.tap_mask().T, per_column).reshape(channels, -1)


class Frames:
    """Phase images of a chunk of channels in their zero frames, flat per channel, and the edge columns
    transposed: (channels, edge columns, rows * samples)."""

    def __init__(self, plan: LagPlan, samples: int) -> None:
        self.plan, self.samples = plan, samples
        (self.my, self.mx), height = plan.margin, max(h for h, _ in plan.shapes)
        self.height, self.width = height, max(w for _, w in plan.shapes) + self.mx  # zeros on the right
        self.grid = (height + 2 * self.my, samples, self.width)
        self.size = int(np.prod(self.grid)) + 2 * self.mx  # flat shifts reach a margin beyond the grid
        self.per_channel = self.size * len(plan.phases)
        self.buffers: dict[int, list[np.ndarray]] = {}  # per slot: one input's phase images
        self.columns = self.columns_shifted(0)
        self.partners = np.array([self.columns_shifted(lag[3]) for lag in plan.lags])  # the columns each lag pairs
        groups: dict[tuple[int, int, int], list[int]] = {}
        for k, (a, b, dy, _) in enumerate(plan.lags):
            groups.setdefault((a, b, dy), []).append(k)
        self.row_lag_groups = [(key, np.array(group)) for key, group in groups.items()]
        self.crossing_index, self.crossing_points, self.near_rows = self.crossing_layout()

    def crossing_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices for :meth:`crossings`: the frame rows near the dropped rows (shifted by every lag), the points
        (phase, edge column, near row) of the crossings themselves, and each (lag, row, column)'s product."""
        drop_rows, drop_cols = self.plan.dropped
        near_rows = np.array(sorted({int(y + lag[2]) for y in drop_rows for lag in self.plan.lags}), np.intp)
        shape = (len(self.plan.phases), len(self.plan.edge_columns), len(near_rows))
        phase, row, column = np.meshgrid(np.arange(shape[0]), np.searchsorted(near_rows, drop_rows), self.columns,
                                         indexing="ij")
        points = np.ravel_multi_index((phase, column, row), shape)  # (phase, dropped row, dropped column)
        first = np.arange(points.size).reshape(points.shape)  # their rows of the product matrix
        index = []
        for a, b, dy, dx in self.plan.lags:
            row, column = np.meshgrid(np.searchsorted(near_rows, drop_rows + dy), self.columns_shifted(dx),
                                      indexing="ij")
            index.append(first[a] * int(np.prod(shape)) + np.ravel_multi_index((np.full_like(row, b), column, row),
                                                                                shape))
        return np.array(index, np.intp).reshape(-1), points.ravel(), near_rows + self.my

    def frame(self, image: np.ndarray) -> np.ndarray:
        """The (..., rows, samples, columns) view of flat frames."""
        return image[..., self.mx:self.size - self.mx].reshape(*image.shape[:-1], *self.grid)

    def edge_arrays(self, channels: int) -> list[np.ndarray]:
        """Per phase, room for every channel's edge columns: (channels, edge columns, rows * samples)."""
        shape = (channels, len(self.plan.edge_columns), self.grid[0] * self.grid[1])
        return [np.empty(shape, np.float32) for _ in self.plan.phases]

    def fill(self, x: np.ndarray, strides: tuple[int, int], edges: list[np.ndarray], chunk: slice, slot: int = 0
             ) -> list[np.ndarray]:
        """The phase images of ``x`` (n, c, H, W), channels ``chunk`` of the layer, in the frames of ``slot``
        (reused: the margins stay zero); their frame columns the column dots read are copied into ``edges``."""
        if slot not in self.buffers or len(self.buffers[slot][0]) < x.shape[1]:
            self.buffers[slot] = [np.zeros((x.shape[1], self.size), np.float32) for _ in self.plan.phases]
        images = []
        for (ry, rx), (h, w), buffer, edge in zip(self.plan.phases, self.plan.shapes, self.buffers[slot], edges,
                                                  strict=True):
            image = buffer[:x.shape[1]]
            target = self.frame(image)[:, self.my:self.my + h, :, :w]
            target[...] = x[:, :, ry::strides[0], rx::strides[1]].transpose(1, 2, 0, 3)
            images.append(image)
            columns = self.frame(image)[..., self.plan.edge_columns % self.width]  # left of 0: a right margin
            edge[chunk].reshape(len(image), edge.shape[1], *self.grid[:2])[...] = columns.transpose(0, 3, 1, 2)
        return images

    def row_dots(self, images: list[np.ndarray], partner_images: list[np.ndarray], out: np.ndarray) -> None:
        """Every lagged map (phase a of ``images`` times phase b of ``partner_images`` shifted by the lag) summed per
        frame row, into ``out`` (channels, lags, rows)."""
        channels = len(images[0])
        row_length = self.samples * self.width
        begin, span = self.mx + self.my * row_length, self.height * row_length
        for k, (a, b, dy, dx) in enumerate(self.plan.lags):
            shift = dy * row_length + dx
            partner = partner_images[b][:, begin + shift:begin + shift + span]
            dot_last(images[a][:, begin:begin + span].reshape(channels, self.height, row_length),
                     partner.reshape(channels, self.height, row_length), out=out[:, k])

    def assemble(self, rows: np.ndarray, edges: list[np.ndarray], partner_edges: list[np.ndarray]) -> np.ndarray:
        """(channels, lags * features) float64 from the row dots and the edge columns of every channel: each map's
        sum over all rows, each dropped row, each dropped column, each crossing of the two (``term_matrix``'s
        order); phase b's edge columns come from ``partner_edges``."""
        drop_rows, drop_cols = self.plan.dropped
        channels, lags, n = len(rows), len(self.plan.lags), self.samples
        top, length = self.my * n, self.height * n
        per_column = np.empty((channels, lags, len(drop_cols)), np.float32)
        dropped = [edge[:, self.columns, top:top + length] for edge in edges]  # each phase's dropped columns
        for (a, b, dy), group in self.row_lag_groups:  # one product for every column lag of a row lag
            products = np.matmul(dropped[a],
                                 partner_edges[b][:, :, top + dy * n:top + dy * n + length].transpose(0, 2, 1))
            per_column[:, group] = products[:, np.arange(len(drop_cols)), self.partners[group]]
        totals = rows.sum(axis=2, dtype=np.float64)[..., None]
        return np.concatenate([totals, rows[:, :, drop_rows], per_column, self.crossings(edges, partner_edges)],
                              axis=2).reshape(channels, -1)

    def columns_shifted(self, dx: int) -> np.ndarray:
        """Where the dropped columns shifted by ``dx`` sit among the edge columns."""
        return np.searchsorted(self.plan.edge_columns, self.plan.dropped[1] + dx)

    def crossings(self, edges: list[np.ndarray], partner_edges: list[np.ndarray]) -> np.ndarray:
        """(channels, lags, dropped rows * dropped columns): each lagged map at the crossings of dropped rows and
        columns, from one small product over the samples of the edge values near the crossings (phase a's from
        ``edges``, phase b's from ``partner_edges``)."""
        near = self.near_values(edges)
        partner = near if partner_edges is edges else self.near_values(partner_edges)
        products = np.matmul(near[:, self.crossing_points], partner.transpose(0, 2, 1))
        return products.reshape(len(near), -1)[:, self.crossing_index].reshape(len(near), len(self.plan.lags), -1)

    def near_values(self, edges: list[np.ndarray]) -> np.ndarray:
        """(channels, phases * edge columns * near rows, samples): the edge values near the crossings."""
        channels = len(edges[0])
        return np.stack([edge.reshape(channels, edge.shape[1], self.grid[0], self.samples)[:, :, self.near_rows]
                         for edge in edges], axis=1).reshape(channels, -1, self.samples)
