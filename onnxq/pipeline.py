"""The quantization pipeline behind the CLI and ``onnxq.quantize``: load, calibrate, round, export, verify."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .act_qdq import quantize_activations
from .bias import BiasSlot, add_missing_biases, bias_slots, output_shift
from .calibrate import LayerStats, calibrate, load_stats, make_session, save_stats
from .errors import OnnxqError
from .export import build_quantized_model, container_bits, layer_metadata, save_atomic, stored_weight_bits
from .images import ImagePreprocessing
from .layers import QUANTIZABLE_OPS, Layer, find_layers
from .loading import load_model_and_layout, proto_size, weights_fingerprint
from .mixed import (
    Budget,
    MixedPlan,
    cache_key,
    read_bits_json,
    sensitivity_and_allocation,
    write_bits_json,
)
from .oracle import LossOracle
from .passes import DEFAULT_METHOD, ROUNDING_PASSES, Grid, QuantWeight
from .prepare import prepare
from .progress import NoProgress
from .rounding import RoundingTask, round_all
from .sequential import round_sequentially
from .shrinkage import shrink_gram
from .sources import (
    Feed,
    InputSpec,
    batches,
    default_preprocessing,
    feed_samples,
    feeds_from,
    held_out_batches,
    model_inputs,
)

log = logging.getLogger("onnxq")
PREFERENCES = ("size", "speed")
METADATA_SLACK_BYTES = 512  # the mixed-precision summary written into the metadata


@dataclass
class LayerReport:
    """One row of the per-layer table."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    bits: int
    stored_bits: int
    relative_error: float
    params: int


@dataclass
class QuantizationResult:
    """What a run produced: the per-layer report, file sizes and a check of the output model."""

    output: Path
    method: str
    layers: list[LayerReport]
    skipped: list[str]
    float_bytes: int
    output_bytes: int
    calibration_samples: int
    output_sqnr_db: float | None = None
    top1_agreement: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.float_bytes if self.float_bytes else 0.0

    def average_bits(self, stored: bool) -> float:
        """Parameter-weighted average width over the quantized layers (logical or as stored)."""
        total = sum(r.params for r in self.layers)
        width = sum(r.params * (r.stored_bits if stored else r.bits) for r in self.layers)
        return width / total if total else 0.0


@dataclass
class Options:
    """Every knob of a run, with the CLI's defaults."""

    bits: int = 4
    method: str = DEFAULT_METHOD
    symmetric: bool = False
    clip: bool = True
    bias_correction: bool = True  # round against the centred Gram matrix and fold the error mean into the bias
    shrinkage: bool = True  # shrink Gram matrices estimated from few rows (classifiers after pooling) to their diagonal
    sequential: bool = False  # round layer after layer on the quantized model's inputs, towards the float outputs
    block_size: int | None = None  # one scale per block of this many inputs (MatMul/Gemm); None: per channel
    matmul_nbits: bool = False  # write 4-bit MatMul layers as com.microsoft.MatMulNBits
    accuracy_level: int = 0  # MatMulNBits' accuracy_level: 0 float activations, 4 int8 activations (faster)
    act_bits: int | None = None  # 8: uint8 activation Q/DQ so onnxruntime runs integer kernels (W8A8)
    act_method: str = "mse"  # activation range calibration: mse, percentile or minmax
    prefer: str = "size"  # "speed": only 8-bit layers get activation Q/DQ (W8A8), and CLADO favours them
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_quantize: tuple[str, ...] = QUANTIZABLE_OPS
    first_last_bits: int | None = None
    bits_per_layer: dict[str, int] = field(default_factory=dict)
    calib_size: int | None = 256
    batch_size: int = 16
    stats: Path | None = None
    preprocessing: ImagePreprocessing | None = None
    allow_empty: bool = False
    external_data: bool | None = None
    jobs: int | None = None
    # mixed precision (CLADO): active when a budget is set
    budget: Budget = field(default_factory=Budget)
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    sensitivity: str = "fast"
    clado_samples: int = 128
    clado_time_limit: float = 60.0
    verify_samples: int = 512  # held-out samples to check the allocation on vs diagonal-only and uniform (0: off)
    sensitivity_cache: Path | None = None
    bits_json: Path | None = None

    def __post_init__(self) -> None:
        for name in ("stats", "sensitivity_cache", "bits_json"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.prefer not in PREFERENCES:
            raise OnnxqError(f"--prefer must be one of {', '.join(PREFERENCES)}, not {self.prefer!r}")
        if self.prefer == "speed" and self.act_bits is None:
            self.act_bits = 8  # speed comes from onnxruntime's integer kernels, which need 8-bit activations


def check_output_path(model_path: Path, output: Path) -> None:
    """Refuse outputs that would overwrite the input or cannot be written, before any work is done."""
    if output.exists() and output.resolve() == model_path.resolve():
        raise OnnxqError(f"output {output} is the input model; choose another output path")
    if output.is_dir():
        raise OnnxqError(f"output {output} is a folder; give a file name such as {output / 'model_q.onnx'}")
    if not output.parent.is_dir():
        raise OnnxqError(f"output folder {output.parent} does not exist; create it first")
    if not os.access(output.parent, os.W_OK):
        raise OnnxqError(f"output folder {output.parent} is not writable; choose another output path")


def layer_bits(layers: list[Layer], options: Options) -> dict[str, int]:
    """The width of each layer: per-layer overrides, then first/last, then the global width."""
    chosen = {layer.name: options.bits for layer in layers}
    if options.first_last_bits and layers:
        chosen[layers[0].name] = chosen[layers[-1].name] = options.first_last_bits
    unknown = set(options.bits_per_layer) - set(chosen)
    if unknown:
        raise OnnxqError(f"bit widths given for unknown layers {sorted(unknown)[:3]}; use names from the layer table")
    chosen.update(options.bits_per_layer)
    return chosen


def collect_stats(model: onnx.ModelProto, layers: list[Layer], calib: object, inputs: list[InputSpec],
                  options: Options, progress: Callable | None) -> tuple[dict[str, LayerStats], Feed | None]:
    """Load cached statistics when they match the model, else calibrate (and cache if asked)."""
    fingerprint = weights_fingerprint(model, [layer.weight for layer in layers])
    if options.stats and options.stats.exists():
        cached = load_stats(options.stats, fingerprint)
        if cached is not None and set(cached) == {layer.name for layer in layers}:
            log.info("reusing calibration statistics from %s", options.stats)
            return cached, first_batch(calib, inputs, options)
        log.warning("statistics in %s are for another model or layer set; recalibrating", options.stats)
    preprocessing = default_preprocessing(inputs, options.preprocessing)
    raw, count = feeds_from(calib, inputs, preprocessing)
    limit = options.calib_size or None
    total = min(count, limit) if (count and limit) else (count or limit)
    first: list[Feed] = []

    def remember_first(stream):
        for feed in stream:
            if not first:
                first.append(feed)
            yield feed

    stream = remember_first(batches(raw, inputs, options.batch_size, limit))
    with (progress(total, "calibrating") if progress else NoProgress()) as bar:
        stats = calibrate(model, layers, stream, on_batch=bar.update)
    if options.stats:
        save_stats(options.stats, stats, fingerprint)
    return stats, (first[0] if first else None)


def first_batch(calib: object, inputs: list[InputSpec], options: Options) -> Feed | None:
    """One calibration batch to check the written model with, or None when the data is unavailable."""
    try:
        raw, _ = feeds_from(calib, inputs, default_preprocessing(inputs, options.preprocessing))
        return next(batches(raw, inputs, options.batch_size, options.batch_size), None)
    except OnnxqError:
        return None


def weight_symmetric(bits: int, options: Options) -> bool:
    """With activation quantization, 8-bit weights are symmetric: onnxruntime's integer kernels need zero point 0."""
    return options.symmetric or (options.act_bits is not None and bits == 8)


def activation_layers(layers: list[Layer], results: dict[str, QuantWeight], options: Options) -> list[str]:
    """The layers whose inputs get uint8 Q/DQ: all of them, or with ``prefer="speed"`` the 8-bit ones only
    (W8A8 runs in integer kernels; a 2-4-bit weight has no integer kernel and stays weight-only in float)."""
    if options.prefer == "speed":
        return [layer.name for layer in layers if results[layer.name].grid.bits == 8]
    return [layer.name for layer in layers]


def with_activations(model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[Layer], calib: object,
                     inputs: list[InputSpec], options: Options, act_layers: list[str]) -> onnx.ModelProto:
    """Add uint8 activation Q/DQ around the given quantized layers, ranges calibrated on the float model."""
    if options.act_bits != 8:
        raise OnnxqError(f"--act-bits {options.act_bits} is not supported; use --act-bits 8")
    if not act_layers:
        log.warning("no layer is at 8 bits, so none runs in integer kernels; the model stays weight-only")
        return quantized
    raw, _ = feeds_from(calib, inputs, default_preprocessing(inputs, options.preprocessing))
    stream = batches(raw, inputs, options.batch_size, options.calib_size or None)
    return quantize_activations(model, quantized, layers, stream, options.act_method, act_layers)


def layer_block_size(layer: Layer, options: Options) -> int | None:
    """Block-wise scales apply to 2-D weights (MatMul, Gemm); Conv layers stay per channel."""
    if options.block_size is not None and options.block_size < 1:
        raise OnnxqError(f"block size must be positive, not {options.block_size}")
    return options.block_size if options.block_size and len(layer.shape) == 2 else None


def corrected_layers(model: onnx.ModelProto, layers: list[Layer], options: Options) -> dict[str, BiasSlot]:
    """With bias correction on, give bias-less Conv/Gemm layers a zero bias (in place) and return the layers
    whose bias can absorb the error mean."""
    if not options.bias_correction:
        return {}
    add_missing_biases(model, layers)
    return bias_slots(model, layers)


def layer_gram(layer: Layer, stats: LayerStats, centred: bool, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix a pass rounds against (centred with bias correction, shrunk when its rows are few) and
    the calibration Gram its error is reported on."""
    measured = stats.centred_gram if centred else stats.normalised_gram
    if not options.shrinkage:
        return measured, measured
    H, rho = shrink_gram(measured, stats.rows)
    if rho:
        log.info("%s: Gram matrix from %d rows shrunk towards its diagonal (rho %.3f)", layer.name, stats.rows, rho)
    return H, measured


def round_candidates(model: onnx.ModelProto, layers: list[Layer], stats: dict[str, LayerStats],
                     widths: dict[str, tuple[int, ...]], options: Options, progress: Callable | None,
                     slots: dict[str, BiasSlot] | None = None) -> dict[tuple[str, int], tuple[QuantWeight, float]]:
    """Round every layer at each of its widths; returns ``(layer, bits) -> (codes, relative error)``.

    Layers in ``slots`` are rounded against their centred Gram matrix and get the bias shift that completes it.
    """
    if options.method not in ROUNDING_PASSES:
        raise OnnxqError(f"unknown method {options.method!r}; choose one of {', '.join(ROUNDING_PASSES)}")
    slots = slots or {}
    inits = {t.name: t for t in model.graph.initializer}
    tasks, matrices = [], {}
    for layer in layers:
        W = matrices[layer.name] = layer.matrix(onnx.numpy_helper.to_array(inits[layer.weight])).astype(np.float64)
        H, measured = layer_gram(layer, stats[layer.name], layer.name in slots, options)
        block = layer_block_size(layer, options)
        tasks += [RoundingTask((layer.name, b), W, H, Grid(b, weight_symmetric(b, options), block),
                               {"clip": options.clip}, None if H is measured else measured)
                  for b in widths[layer.name]]
    with (progress(len(tasks), f"{options.method} rounding") if progress else NoProgress()) as bar:
        rounded = round_all(tasks, options.method, options.jobs, on_done=lambda: bar.update(1))
    for (name, _), (qw, _) in rounded.items():
        if name in slots:
            qw.bias_shift = output_shift(matrices[name], qw.dequantize(), stats[name].mean)
    return rounded


@dataclass
class CalibrationFeeds:
    """The calibration batches, read afresh on every pass (sequential rounding reads them once per rounding),
    so memory does not grow with the calibration set; a one-shot iterator is kept in memory instead.
    ``samples`` counts the last complete pass."""

    calib: object
    inputs: list[InputSpec]
    options: Options
    samples: int = 0
    _kept: list[Feed] | None = None

    def __iter__(self) -> Iterator[Feed]:
        if self._kept is not None:
            yield from self._kept
            return
        raw, _ = feeds_from(self.calib, self.inputs, default_preprocessing(self.inputs, self.options.preprocessing))
        one_shot = isinstance(self.calib, Iterator) or (hasattr(self.calib, "get_next")
                                                         and not hasattr(self.calib, "rewind"))
        kept: list[Feed] = []
        samples = 0
        for feed in batches(raw, self.inputs, self.options.batch_size, self.options.calib_size or None):
            samples += feed_samples(feed)
            if one_shot:
                kept.append(feed)
            yield feed
        self.samples = samples
        if one_shot:
            self._kept = kept


def calibration_feeds(calib: object, inputs: list[InputSpec], options: Options) -> CalibrationFeeds:
    """The calibration batches as a re-readable iterable (sequential rounding reads them once per rounding)."""
    return CalibrationFeeds(calib, inputs, options)


def round_sequential(model: onnx.ModelProto, layers: list[Layer], bits: dict[str, int], feeds: Iterable[Feed],
                     options: Options, progress: Callable | None,
                     slots: dict[str, BiasSlot]) -> dict[str, tuple[QuantWeight, float]]:
    """Round the layers stage by stage on the inputs of the model quantized so far (``sequential.py``);
    returns the quantized weights with their errors."""
    if options.method not in ROUNDING_PASSES:
        raise OnnxqError(f"unknown method {options.method!r}; choose one of {', '.join(ROUNDING_PASSES)}")

    def round_stage(work: list) -> dict[str, tuple[QuantWeight, float]]:
        tasks = []
        for layer, target, S, rows in work:
            H, rho = shrink_gram(S, rows) if options.shrinkage else (S, 0.0)
            b = bits[layer.name]
            tasks.append(RoundingTask(layer.name, target, H, Grid(b, weight_symmetric(b, options),
                                      layer_block_size(layer, options)), {"clip": options.clip},
                                      S if rho else None))
        return round_all(tasks, options.method, options.jobs)

    with (progress(len(layers), f"sequential {options.method} rounding") if progress else NoProgress()) as bar:
        return round_sequentially(model, layers, feeds, round_stage, slots, on_stage=bar.update)


def layer_reports(layers: list[Layer], chosen: dict[str, tuple[QuantWeight, float]]) -> list[LayerReport]:
    """The per-layer table rows for the chosen quantized weights."""
    return [LayerReport(layer.name, layer.op_type, layer.shape, chosen[layer.name][0].grid.bits,
                        container_bits(layer, chosen[layer.name][0].grid.bits), chosen[layer.name][1], layer.params)
            for layer in layers]


def verify(path: Path, reference: onnx.ModelProto, feed: Feed | None) -> tuple[float | None, float | None]:
    """Load the written model in onnxruntime and run it; return output SQNR (dB) and top-1 agreement."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise OnnxqError(f"the written model does not load in onnxruntime ({str(err).splitlines()[0][:160]}); "
                         "please report this") from err
    if feed is None:
        return None, None
    quantized = session.run(None, feed)[0].astype(np.float64)
    expected = make_session(reference).run(None, feed)[0].astype(np.float64)
    noise = float(((quantized - expected) ** 2).sum())
    sqnr = 10 * np.log10(float((expected**2).sum()) / noise) if noise > 0 else float("inf")
    agreement = None
    if expected.ndim == 2 and expected.shape[1] > 1:
        agreement = float((quantized.argmax(1) == expected.argmax(1)).mean())
    return sqnr, agreement


def quantize_model(model_path: str | Path, calib: object, output: str | Path, options: Options,
                   progress: Callable | None = None) -> QuantizationResult:
    """Quantize ``model_path`` with calibration data ``calib`` and write ``output``; see the CLI for options."""
    model_path, output = Path(model_path), Path(output)
    check_output_path(model_path, output)
    original, external = load_model_and_layout(model_path)
    model = prepare(original)
    del original  # a >2 GB model is held in memory several times over; drop the copies as soon as they are done
    layers, skipped = find_layers(model, tuple(options.op_types_to_quantize), tuple(options.nodes_to_exclude))
    if not layers and not options.allow_empty:
        raise OnnxqError("the model has no Conv, Gemm or MatMul with a constant float weight to quantize; "
                         "pass --allow-empty to write it unchanged")
    mixed = options.budget.is_set()
    if options.bits_json and not mixed and options.bits_json.exists():
        options.bits_per_layer = {**read_bits_json(options.bits_json, layers), **options.bits_per_layer}
    bits = layer_bits(layers, options)
    inputs = model_inputs(model)
    sequential = options.sequential and bool(layers)
    if sequential and options.stats and not mixed:
        log.info("sequential rounding captures its statistics stage by stage; %s is not used", options.stats)
    stats, first_feed = ({}, None) if (sequential and not mixed) or not layers else collect_stats(
        model, layers, calib, inputs, options, progress)
    slots = corrected_layers(model, layers, options)
    plan = None
    samples = next(iter(stats.values())).samples if stats else 0
    if mixed:  # with --sequential, the allocations it compares and the one it keeps are rounded sequentially
        plan, chosen = mixed_precision(model, model_path, layers, stats, calib, inputs, options, progress, slots)
    elif sequential:
        feeds = calibration_feeds(calib, inputs, options)
        chosen = round_sequential(model, layers, bits, feeds, options, progress, slots)
        samples = feeds.samples
    else:
        rounded = round_candidates(model, layers, stats, {n: (b,) for n, b in bits.items()}, options, progress,
                                   slots)
        chosen = {name: rounded[(name, b)] for name, b in bits.items()}
    results = {name: qw for name, (qw, _) in chosen.items()}
    metadata = {"onnxq.method": options.method, "onnxq.layers": layer_metadata(layers, results)}
    if sequential:
        metadata["onnxq.sequential"] = "1"  # rounded on the quantized model's inputs (see sequential.py)
    if plan is not None:
        metadata["onnxq.mixed_precision"] = json.dumps({
            "estimator": plan.estimator, "status": plan.status, "gap": plan.gap,
            "predicted_loss": plan.predicted_loss, "prefer": plan.prefer,
            "verified": plan.verified, "picked": plan.picked, "integer_mac_share": plan.integer_mac_share})
    quantized = build_quantized_model(model, layers, results, metadata, options.matmul_nbits, options.accuracy_level)
    if options.act_bits is not None and layers:
        quantized = with_activations(model, quantized, layers, calib, inputs, options,
                                     activation_layers(layers, results, options))
    save_atomic(quantized, output, external if options.external_data is None and external else options.external_data)
    try:
        sqnr, agreement = verify(output, model, first_feed or first_batch(calib, inputs, options))
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    extra = {"mixed": plan} if plan is not None else {}
    method = f"{options.method}, sequential" if sequential else options.method
    return QuantizationResult(output, method, layer_reports(layers, chosen), skipped,
                              _file_size(model_path), _file_size(output), samples, sqnr, agreement, extra)


def unquantized_bytes(model: onnx.ModelProto, layers: list[Layer], results: dict[str, QuantWeight]) -> int:
    """Bytes of an exported model other than its quantized weights (codes, scales, zero points): graph, float
    tensors, metadata. Measured by exporting one assignment and subtracting those, so that a size budget is what
    the file holds.
    """
    exported = build_quantized_model(model, layers, results, {"onnxq.layers": layer_metadata(layers, results)})
    weights = sum(stored_weight_bits(layer, results[layer.name].grid.bits, results[layer.name].grid.block_size)
                  for layer in layers) // 8
    return proto_size(exported) - weights + METADATA_SLACK_BYTES


def mixed_precision(model: onnx.ModelProto, model_path: Path, layers: list[Layer], stats: dict[str, LayerStats],
                    calib: object, inputs: list[InputSpec], options: Options, progress: Callable | None,
                    slots: dict[str, BiasSlot] | None = None) -> tuple[MixedPlan, dict[str, tuple[QuantWeight, float]]]:
    """CLADO: round every candidate width, measure sensitivities, allocate under the budget."""
    choices = tuple(sorted(set(options.bit_choices)))
    fixed = {layers[0].name, layers[-1].name} if options.first_last_bits else set()
    widths = {layer.name: (options.first_last_bits,) if layer.name in fixed else choices for layer in layers}
    widths.update({name: (b,) for name, b in options.bits_per_layer.items()})
    candidates = round_candidates(model, layers, stats, widths, options, progress, slots)

    seen = next(iter(stats.values())).samples

    warned: list[bool] = []  # the sensitivity and the verification oracle share one fallback warning

    def oracle(samples: int = options.clado_samples) -> LossOracle:
        feeds = oracle_feeds(calib, inputs, options, seen, samples, warn=not warned)
        warned.append(True)
        return LossOracle(model, layers, feeds, slots=slots)

    float_bytes = _file_size(model_path)
    fixed_bytes = unquantized_bytes(model, layers, {name: candidates[(name, w[0])][0] for name, w in widths.items()})
    fingerprint = weights_fingerprint(model, [layer.weight for layer in layers])
    per_layer = [widths[layer.name] for layer in layers]
    method = options.method + ("+bias_correction" if slots else "") + ("+shrinkage" if options.shrinkage else "")
    method += "+held_out"  # sensitivities on samples the statistics did not use
    key = cache_key(fingerprint, per_layer, method, options.sensitivity, options.clado_samples)
    macs = layer_macs(layers, stats) if options.prefer == "speed" else None
    rounded_sequentially: dict[tuple, dict[str, tuple[QuantWeight, float]]] = {}
    feeds = calibration_feeds(calib, inputs, options)  # read on each sequential rounding

    def sequential_weights(bits: dict[str, int]) -> dict[str, tuple[QuantWeight, float]]:
        """One allocation rounded sequentially (what --sequential exports), remembered for the final choice."""
        key = tuple(sorted(bits.items()))
        if key not in rounded_sequentially:
            rounded_sequentially[key] = round_sequential(model, layers, bits, feeds, options, progress, slots)
        return rounded_sequentially[key]

    plan = sensitivity_and_allocation(oracle, layers, {k: qw for k, (qw, _) in candidates.items()}, per_layer,
                                      options.budget, options.sensitivity, fixed_bytes, float_bytes,
                                      options.sensitivity_cache, key, options.clado_time_limit, progress, macs,
                                      (lambda: oracle(options.verify_samples)) if options.verify_samples else None,
                                      (lambda bits: {n: qw for n, (qw, _) in sequential_weights(bits).items()})
                                      if options.sequential else None)
    if options.bits_json:
        write_bits_json(options.bits_json, layers, plan.bits)
    if options.sequential:
        return plan, sequential_weights(plan.bits)
    return plan, {name: candidates[(name, b)] for name, b in plan.bits.items()}


def oracle_feeds(calib: object, inputs: list[InputSpec], options: Options, seen: int,
                 samples: int | None = None, warn: bool = True) -> list[Feed]:
    """The ``samples`` (default ``clado_samples``) that losses are measured on: held out from the ``seen`` that
    the statistics came from, so the oracle does not reward rounding that fits those samples only; the first
    ones when the data has no more."""
    samples = samples or options.clado_samples
    preprocessing = default_preprocessing(inputs, options.preprocessing)
    raw, _ = feeds_from(calib, inputs, preprocessing)
    feeds, count = held_out_batches(raw, inputs, options.batch_size, seen, samples)
    if count >= min(samples, 16):
        return feeds
    if warn:
        log.warning("sensitivities measured on calibration samples the statistics also used (the data has %d "
                    "beyond the %d calibrated on); give more than --calib-size + --clado-samples for a held-out "
                    "estimate", count, seen)
    raw, _ = feeds_from(calib, inputs, preprocessing)
    return list(batches(raw, inputs, options.batch_size, samples))


def layer_macs(layers: list[Layer], stats: dict[str, LayerStats]) -> dict[str, float]:
    """Multiply-adds per sample of each layer: its weights times the rows (output positions) each sample gives."""
    return {layer.name: layer.params * stats[layer.name].rows / max(stats[layer.name].samples, 1)
            for layer in layers}


def _file_size(path: Path) -> int:
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
