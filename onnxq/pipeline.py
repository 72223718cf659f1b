"""The quantization pipeline behind the CLI and ``onnxq.quantize``: load, calibrate, round, export, verify."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxq.allocation.distributed import Cluster
from onnxq.allocation.mixed import (
    Budget,
    MixedPlan,
    cache_key,
    read_bits_json,
    sensitivity_and_allocation,
    write_bits_json,
)
from onnxq.allocation.oracle import LossOracle
from onnxq.calibration.calibrate import LayerStats, calibrate
from onnxq.calibration.capture import make_session
from onnxq.calibration.stats_cache import load_stats, save_stats, sensitivity_fingerprint, statistics_key
from onnxq.config import DEFAULT_ACCURACY_LEVEL, DEFAULT_BITS, DEFAULT_VERIFY_SAMPLES, Config
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import Feed, model_inputs
from onnxq.errors import OnnxqError, first_line
from onnxq.export.act_qdq import quantize_activations
from onnxq.export.outputs import check_outputs, model_files
from onnxq.export.qdq import build_quantized_model, container_bits, layer_metadata, staged_model, stored_weight_bits
from onnxq.graph.bias import BiasSlot, add_missing_biases, bias_slots, output_shift
from onnxq.graph.float16 import refuse_float16_activations, without_inserted_casts
from onnxq.graph.layers import QUANTIZABLE_OPS, Layer, find_layers, nothing_to_quantize
from onnxq.graph.loading import load_model_and_layout, proto_size
from onnxq.graph.opset import fit_opset
from onnxq.graph.prepare import prepare
from onnxq.passes import DEFAULT_METHOD, ROUNDING_PASSES, Grid, QuantWeight
from onnxq.report.progress import NoProgress
from onnxq.rounding.degenerate import check_rounding_inputs
from onnxq.rounding.pool import RoundingTask, round_all
from onnxq.rounding.sequential import round_sequentially
from onnxq.rounding.shrinkage import shrink_gram

log = logging.getLogger("onnxq")
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

    output: Path | None
    method: str
    layers: list[LayerReport]
    skipped: list[str]
    float_bytes: int
    output_bytes: int
    calibration_samples: int
    output_sqnr_db: float | None = None
    top1_agreement: float | None = None
    mixed: MixedPlan | None = None  # the CLADO allocation, with a budget
    model: onnx.ModelProto | None = None  # the quantized model, when onnxq.quantize was given no output path
    check_held_out: bool = False  # the check batch was held out from calibration (else a calibration batch)

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
    """The pipeline's flat view of a :class:`onnxq.config.Config` (built by :func:`options_from`)."""

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
    workers: int | None = None  # sensitivity probes in this many local Ray workers
    ray_address: str | None = None  # ... or on this Ray cluster


def options_from(config: Config) -> Options:
    """The pipeline's flat view of a validated config (a fresh copy per run: the caller's config is never
    changed), with the defaults that depend on other options resolved."""
    layers, rounding, data, export = config.layers, config.rounding, config.data, config.export
    mixed, acts = config.mixed, config.activations
    flat = Options(
        bits=layers.bits or DEFAULT_BITS, method=rounding.method, symmetric=bool(rounding.symmetric),
        clip=rounding.clip, bias_correction=rounding.bias_correction, shrinkage=rounding.shrinkage,
        sequential=rounding.sequential, block_size=rounding.block_size, matmul_nbits=export.matmul_nbits,
        accuracy_level=export.accuracy_level or DEFAULT_ACCURACY_LEVEL, nodes_to_exclude=layers.nodes_to_exclude,
        op_types_to_quantize=layers.op_types_to_quantize, first_last_bits=layers.first_last_bits,
        bits_per_layer=dict(layers.bits_per_layer), calib_size=data.calib_size or None, batch_size=data.batch_size,
        stats=data.stats, preprocessing=data.preprocessing, allow_empty=layers.allow_empty,
        external_data=export.external_data, jobs=rounding.jobs, bits_json=layers.bits_json)
    if acts is not None:
        flat.act_bits, flat.act_method, flat.prefer = acts.bits, acts.method, acts.prefer
    if mixed is not None:
        flat.budget = Budget(mixed.avg_bits, mixed.size_mb, mixed.size_ratio)
        flat.bit_choices, flat.sensitivity, flat.clado_samples = mixed.bit_choices, mixed.sensitivity, mixed.samples
        flat.clado_time_limit, flat.sensitivity_cache = mixed.time_limit, mixed.sensitivity_cache
        flat.verify_samples = DEFAULT_VERIFY_SAMPLES if mixed.verify_samples is None else mixed.verify_samples
        flat.workers, flat.ray_address = mixed.workers, mixed.ray_address
    return flat


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


def collect_stats(model: onnx.ModelProto, layers: list[Layer], data: CalibrationSet, options: Options,
                  progress: Callable | None) -> dict[str, LayerStats]:
    """Load cached statistics when their key (model, data, preprocessing, sizes) matches, else calibrate on the
    calibration split (and cache if asked)."""
    if options.stats:
        key, _ = statistics_key(model, layers, data.identity(), data.inputs, options, [options.stats])
        cached = load_stats(options.stats, key, layers)
        if cached is not None:
            return cached
    with progress(None, "reading calibration data") if progress else NoProgress():
        samples = data.samples  # decoded and validated once, here
    with (progress(samples, "calibrating") if progress else NoProgress()) as bar:
        stats = calibrate(model, layers, data.calibration(), on_batch=bar.update)
    if options.stats:
        save_stats(options.stats, stats, key)
    return stats


def held_out_needed(options: Options) -> int:
    """Samples to keep beyond the calibration ones: CLADO's oracle and its verification with a budget, else
    one batch to check the written model on."""
    if options.budget.is_set():
        return max(options.clado_samples, options.verify_samples, options.batch_size)
    return options.batch_size


def weight_symmetric(bits: int, options: Options) -> bool:
    """With activation quantization, 8-bit weights are symmetric: onnxruntime's integer kernels need zero point 0."""
    return options.symmetric or (options.act_bits is not None and bits == 8)


def activation_layers(layers: list[Layer], results: dict[str, QuantWeight], options: Options) -> list[str]:
    """The layers whose inputs get uint8 Q/DQ: all of them, or with ``prefer="speed"`` the 8-bit ones only
    (W8A8 runs in integer kernels; a 2-4-bit weight has no integer kernel and stays weight-only in float)."""
    if options.prefer == "speed":
        return [layer.name for layer in layers if results[layer.name].grid.bits == 8]
    return [layer.name for layer in layers]


def with_activations(model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[Layer], data: CalibrationSet,
                     options: Options, act_layers: list[str]) -> onnx.ModelProto:
    """Add uint8 activation Q/DQ around the given quantized layers, ranges calibrated on the float model."""
    if options.act_bits != 8:
        raise OnnxqError(f"--act-bits {options.act_bits} is not supported; use --act-bits 8")
    if not act_layers:
        log.warning("no layer is at 8 bits, so none runs in integer kernels; the model stays weight-only")
        return quantized
    return quantize_activations(model, quantized, layers, data.calibration(), options.act_method, act_layers)


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
    check_rounding_inputs(tasks)
    with (progress(len(tasks), f"{options.method} rounding") if progress else NoProgress()) as bar:
        rounded = round_all(tasks, options.method, options.jobs, on_done=lambda: bar.update(1))
    for (name, _), (qw, _) in rounded.items():
        if name in slots:
            qw.bias_shift = output_shift(matrices[name], qw.dequantize(), stats[name].mean)
    return rounded


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
        check_rounding_inputs(tasks)
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

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings are coloured multi-line text; errors come here
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise OnnxqError(f"the written model does not load in onnxruntime ({first_line(err)}); "
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


def check_batch(data: CalibrationSet) -> tuple[Feed | None, bool]:
    """The batch the written model is checked on (held out when the data has one), or None without data."""
    try:
        return data.check_batch()
    except OnnxqError:  # statistics came from a cache and the calibration source is gone: check loading only
        return None, False


def quantize_model(model_path: str | Path, calib: object, output: str | Path, config: Config,
                   progress: Callable | None = None) -> QuantizationResult:
    """Quantize ``model_path`` with calibration data ``calib`` and write ``output``, as ``config`` says."""
    options = options_from(config)
    model_path, output = Path(model_path), Path(output)
    check_outputs(model_path, {"-o": output, "--stats": options.stats, "--sensitivity-cache": options.sensitivity_cache,
                               "--bits-json": options.bits_json if options.budget.is_set() else None})
    if options.workers or options.ray_address:
        Cluster(options.workers, options.ray_address).check()  # Ray installed, the cluster reachable: before any work
    original, external = load_model_and_layout(model_path)
    model = without_inserted_casts(prepare(fit_opset(original)))
    del original  # a >2 GB model is held in memory several times over; drop the copies as soon as they are done
    layers, skipped = find_layers(model, tuple(options.op_types_to_quantize), tuple(options.nodes_to_exclude))
    refuse_float16_activations(model, options.act_bits)
    if not layers and not options.allow_empty:
        raise nothing_to_quantize(skipped)
    mixed = options.budget.is_set()
    if options.bits_json and not mixed and options.bits_json.exists():
        options.bits_per_layer = {**read_bits_json(options.bits_json, layers), **options.bits_per_layer}
    bits = layer_bits(layers, options)
    data = CalibrationSet(calib, model_inputs(model), options.preprocessing, options.batch_size,
                          options.calib_size, held_out_needed(options))
    try:
        return quantize_with(model, model_path, external, layers, skipped, bits, data, output, options, progress)
    finally:
        data.close()


def quantize_with(model: onnx.ModelProto, model_path: Path, external: bool, layers: list[Layer], skipped: list[str],
                  bits: dict[str, int], data: CalibrationSet, output: Path, options: Options,
                  progress: Callable | None) -> QuantizationResult:
    """Calibrate, round (fixed widths, CLADO or sequential), export and check: the stages after loading."""
    mixed = options.budget.is_set()
    sequential = options.sequential and bool(layers)
    if sequential and options.stats and not mixed:
        log.info("sequential rounding captures its statistics stage by stage; %s is not used", options.stats)
    stats = {} if (sequential and not mixed) or not layers else collect_stats(model, layers, data, options, progress)
    slots = corrected_layers(model, layers, options)
    plan = None
    samples = next(iter(stats.values())).samples if stats else 0
    if mixed:  # with --sequential, the allocations it compares and the one it keeps are rounded sequentially
        plan, chosen = mixed_precision(model, model_path, layers, stats, data, options, progress, slots)
    elif sequential:
        feeds = data.calibration_batches()  # read back on every pass, one batch in memory at a time
        chosen = round_sequential(model, layers, bits, feeds, options, progress, slots)
        samples = data.samples
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
        quantized = with_activations(model, quantized, layers, data, options,
                                     activation_layers(layers, results, options))
    check_feed, held_out = check_batch(data)
    layout = external if options.external_data is None and external else options.external_data
    with progress(None, "writing and checking the model") if progress else NoProgress():
        with staged_model(quantized, output, layout) as (staged, _):  # checked under its temporary name
            sqnr, agreement = verify(staged, model, check_feed)
    if plan is not None and options.bits_json:  # a result like the model: written once the model passed its check
        write_bits_json(options.bits_json, layers, plan.bits)
    method = f"{options.method}, sequential" if sequential else options.method
    return QuantizationResult(output, method, layer_reports(layers, chosen), skipped,
                              _file_size(model_path), _file_size(output), samples, sqnr, agreement, plan,
                              check_held_out=held_out)


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
                    data: CalibrationSet, options: Options, progress: Callable | None,
                    slots: dict[str, BiasSlot] | None = None) -> tuple[MixedPlan, dict[str, tuple[QuantWeight, float]]]:
    """CLADO: round every candidate width, measure sensitivities, allocate under the budget."""
    choices = tuple(sorted(set(options.bit_choices)))
    fixed = {layers[0].name, layers[-1].name} if options.first_last_bits else set()
    widths = {layer.name: (options.first_last_bits,) if layer.name in fixed else choices for layer in layers}
    widths.update({name: (b,) for name, b in options.bits_per_layer.items()})
    candidates = round_candidates(model, layers, stats, widths, options, progress, slots)

    warned: list[bool] = []  # the sensitivity and the verification oracle share one fallback warning

    def oracle(samples: int = options.clado_samples) -> LossOracle:
        feeds = oracle_feeds(data, samples, warn=not warned)
        warned.append(True)
        return LossOracle(model, layers, feeds, slots=slots)

    float_bytes = _file_size(model_path)
    fixed_bytes = unquantized_bytes(model, layers, {name: candidates[(name, w[0])][0] for name, w in widths.items()})
    fingerprint = (sensitivity_fingerprint(model, layers, data.identity(), data.inputs, options)
                   if options.sensitivity_cache else "")
    per_layer = [widths[layer.name] for layer in layers]
    method = options.method + ("+bias_correction" if slots else "") + ("+shrinkage" if options.shrinkage else "")
    method += "+held_out"  # sensitivities on samples the statistics did not use
    key = cache_key(fingerprint, per_layer, method, options.sensitivity, options.clado_samples)
    macs = layer_macs(layers, stats) if options.prefer == "speed" else None
    rounded_sequentially: dict[tuple, dict[str, tuple[QuantWeight, float]]] = {}
    feeds = data.calibration_batches()  # read back on each sequential rounding

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
                                      if options.sequential else None,
                                      Cluster(options.workers, options.ray_address)
                                      if options.workers or options.ray_address else None)
    if options.sequential:
        return plan, sequential_weights(plan.bits)
    return plan, {name: candidates[(name, b)] for name, b in plan.bits.items()}


def oracle_feeds(data: CalibrationSet, samples: int, warn: bool = True) -> list[Feed]:
    """The ``samples`` that losses are measured on: held out from the calibration samples, so the oracle does not
    reward rounding that fits those samples only; the first calibration samples when the data has no more."""
    if min(samples, data.held_out_samples) >= min(samples, 16):
        return data.held_out(samples)
    if warn:
        log.warning("sensitivities measured on calibration samples the statistics also used (the data has %d "
                    "beyond the %d calibrated on); give more than --calib-size + --clado-samples for a held-out "
                    "estimate", data.held_out_samples, data.samples)
    return data.first(samples)


def layer_macs(layers: list[Layer], stats: dict[str, LayerStats]) -> dict[str, float]:
    """Multiply-adds per sample of each layer: its weights times the rows (output positions) each sample gives."""
    return {layer.name: layer.params * stats[layer.name].rows / max(stats[layer.name].samples, 1)
            for layer in layers}


def _file_size(path: Path) -> int:
    """Bytes of a model file and the external data it references."""
    return sum(f.stat().st_size for f in model_files(path))
