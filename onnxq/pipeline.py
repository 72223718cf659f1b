"""The quantization pipeline behind the CLI and the Python API: load, calibrate, allocate, round, export, verify.

A :class:`Run` holds what the stages share (the prepared model, its layers, the calibration set and the frozen
:class:`onnxq.config.Config`, read directly); ``calibrate``, ``allocate`` and ``quantize`` in ``onnxq.api`` open one
and call the stages below in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
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
from onnxq.allocation.oracle import LossOracle, log_softmax
from onnxq.calibration.activations import HistogramObserver, ranges_from
from onnxq.calibration.calibrate import LayerStats, calibrate
from onnxq.calibration.capture import capture, make_session
from onnxq.calibration.stats_cache import (
    Statistics,
    key_difference,
    load_stats,
    save_stats,
    sensitivity_fingerprint,
    statistics_key,
)
from onnxq.config import DEFAULT_ACCURACY_LEVEL, DEFAULT_BITS, DEFAULT_VERIFY_SAMPLES, Config
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.masking import attention_mask_name
from onnxq.data.preprocess_check import preprocessing_for
from onnxq.data.sources import Feed, check_samples, model_inputs
from onnxq.errors import OnnxqError, first_line
from onnxq.export.act_qdq import add_activation_qdq, calibration_candidates, plan_qdq
from onnxq.export.outputs import check_outputs, model_files
from onnxq.export.qdq import (
    block_scale_bits,
    build_quantized_model,
    container_bits,
    layer_metadata,
    quantized_graph,
    staged_model,
    stored_weight_bits,
)
from onnxq.graph.bias import BiasSlot, bias_slots, output_shift, with_zero_biases
from onnxq.graph.boundary import boundary_layers
from onnxq.graph.float16 import refuse_float16_activations, without_inserted_casts
from onnxq.graph.layers import Layer, find_layers, nothing_to_quantize
from onnxq.graph.loading import load_model_and_layout, proto_size
from onnxq.graph.model import GraphModel
from onnxq.graph.opset import fit_opset
from onnxq.graph.prepare import prepare
from onnxq.passes import ROUNDING_PASSES, Grid, QuantWeight
from onnxq.passes.shrinkage import shrink_gram
from onnxq.report.advice import advise
from onnxq.report.progress import NoProgress
from onnxq.rounding.degenerate import check_rounding_inputs
from onnxq.rounding.pool import RoundingTask, round_all
from onnxq.rounding.sequential import round_sequentially

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
    scale_bits: int = 0  # bits of block-wise scales and zero points (per-channel ones are not counted)


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
    check_kl: float | None = None  # mean KL divergence from the float model's softmax on the check batch

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.float_bytes if self.float_bytes else 0.0

    def average_bits(self, stored: bool) -> float:
        """Parameter-weighted average width over the quantized layers (logical or as stored)."""
        total = sum(r.params for r in self.layers)
        width = sum(r.params * r.stored_bits + r.scale_bits if stored else r.params * r.bits for r in self.layers)
        return width / total if total else 0.0


@dataclass
class Run:
    """What the stages of one run share: the prepared model, its layers, the calibration set and the config.

    The stages run in order: statistics are measured on the prepared model, then bias-less layers get a zero bias
    (``bias_slots``) that rounding, the loss oracle and export use.
    """

    model: onnx.ModelProto
    model_path: Path
    external: bool  # the input keeps its weights in external data (the output does too unless told)
    layers: list[Layer]
    skipped: list[str]
    data: CalibrationSet
    config: Config  # with the preprocessing the run uses (flags, preset, the model's metadata, the default)
    preprocessing_metadata: dict[str, str] = field(default_factory=dict)  # what the output records of it
    edge_layers: list[str] = field(default_factory=list)  # what --first-last-bits widens (graph/boundary.py)

    @cached_property
    def bias_slots(self) -> dict[str, BiasSlot]:
        """The layers whose bias absorbs their error mean (with bias correction on; bias-less ones get a zero bias:
        ``model`` becomes the model with them, once, so read ``model`` after this)."""
        self.model, slots = with_bias_slots(self.model, self.layers, self.config)
        return slots

    def calibrate(self, progress: Callable | None = None) -> Statistics:
        """The statistics of this run, with their key (reused from, or saved to, ``stats`` in the config)."""
        return collect_statistics(self, progress, keyed=True)

    def round(self, widths: Iterable[int], statistics: Statistics,
              progress: Callable | None = None) -> dict[tuple[str, int], QuantWeight]:
        """Every layer rounded at each of ``widths`` as a run rounds it (the config's method, grid options, bias
        correction and shrinkage): ``(layer, bits) -> QuantWeight``."""
        widths, slots = tuple(widths), self.bias_slots  # slots first: they give the model its zero biases
        rounded = round_candidates(self.model, self.layers, statistics.layers,
                                   {layer.name: widths for layer in self.layers}, self.config, progress, slots)
        return {key: qw for key, (qw, _) in rounded.items()}

    def loss_oracle(self, samples: int) -> LossOracle:
        """CLADO's loss oracle on ``samples`` held-out samples (calibration ones when the data has no more)."""
        slots = self.bias_slots  # first: they give the model its zero biases
        return LossOracle(self.model, self.layers, oracle_feeds(self.data, samples), slots=slots)


@contextmanager
def opened(model_path: str | Path, calib: object, config: Config, outputs: dict[str, Path | None]) -> Iterator[Run]:
    """Check the outputs, load and prepare the model, find its layers and open the calibration set (closed on
    exit)."""
    model_path = Path(model_path)
    check_outputs(model_path, outputs)
    cluster = cluster_of(config)
    if cluster is not None:
        cluster.check()  # Ray installed, the cluster reachable: before any work
    original, external = load_model_and_layout(model_path)
    model = without_inserted_casts(prepare(fit_opset(original)))
    del original  # a >2 GB model is held in memory several times over; drop the copies as soon as they are done
    graph = GraphModel(model)
    layers, skipped = find_layers(graph, tuple(config.layers.op_types_to_quantize),
                                  tuple(config.layers.nodes_to_exclude))
    edges = boundary_layers(graph, layers)
    del graph  # the run works on the proto from here
    refuse_float16_activations(model, act_bits(config))
    if not layers and not config.layers.allow_empty:
        raise nothing_to_quantize(skipped)
    preprocessing, recorded = preprocessing_for(model, calib, config.data.preprocessing)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, preprocessing=preprocessing))
    data = CalibrationSet(calib, model_inputs(model), preprocessing, config.data.batch_size,
                          config.data.calib_size or None, held_out_needed(config))
    try:
        yield Run(model, model_path, external, layers, skipped, data, config, recorded,
                  edges)
    finally:
        data.close()


# -- what the config implies: defaults that depend on other options, resolved in one place -------------------------

def budget_of(config: Config) -> Budget:
    """The mixed-precision budget (unset without one)."""
    mixed = config.mixed
    return Budget(mixed.avg_bits, mixed.size_mb, mixed.size_ratio) if mixed is not None else Budget()


def cluster_of(config: Config) -> Cluster | None:
    """Where the sensitivity probes run: local Ray workers or a Ray cluster, else None (this process)."""
    mixed = config.mixed
    if mixed is None or not (mixed.workers or mixed.ray_address):
        return None
    return Cluster(mixed.workers, mixed.ray_address)


def act_bits(config: Config) -> int | None:
    """The activation width (8 for W8A8), None for weight-only."""
    return config.activations.bits if config.activations is not None else None


def prefer(config: Config) -> str:
    """``speed``: only 8-bit layers get activation Q/DQ and CLADO favours them; else ``size``."""
    return config.activations.prefer if config.activations is not None else "size"


def verify_samples(config: Config) -> int:
    """Held-out samples the allocation is checked on (0: off); only with a budget."""
    mixed = config.mixed
    if mixed is None:
        return 0
    return DEFAULT_VERIFY_SAMPLES if mixed.verify_samples is None else mixed.verify_samples


def bits_overrides(layers: list[Layer], config: Config) -> dict[str, int]:
    """Per-layer widths given by the user: ``--bits-per-layer`` over a ``--bits-json`` read (without a budget)."""
    overrides = dict(config.layers.bits_per_layer)
    bits_json = config.layers.bits_json
    if bits_json and config.mixed is None and bits_json.exists():
        overrides = {**read_bits_json(bits_json, layers), **overrides}
    return overrides


def layer_bits(layers: list[Layer], config: Config, overrides: dict[str, int], edges: list[str] = ()
               ) -> dict[str, int]:
    """The width of each layer: per-layer overrides, then first/last, then the global width."""
    chosen = {layer.name: config.layers.bits or DEFAULT_BITS for layer in layers}
    first_last = config.layers.first_last_bits
    if first_last and layers:
        chosen.update(dict.fromkeys(edges or (layers[0].name, layers[-1].name), first_last))
    unknown = set(overrides) - set(chosen)
    if unknown:
        raise OnnxqError(f"bit widths given for unknown layers {sorted(unknown)[:3]}; use names from the layer table")
    chosen.update(overrides)
    return chosen


def collect_statistics(run: Run, progress: Callable | None, gram: bool = True, keyed: bool = False) -> Statistics:
    """The run's statistics in one pass over the calibration split: each layer's Gram statistics (``gram``) and, with
    activation quantization, the histograms of every tensor that may get activation Q/DQ. With ``--stats``, a file
    whose key matches is reused and a new one is written; ``keyed``: compute the key anyway (to save or check)."""
    config, layers, data = run.config, run.layers, run.data
    tensors, histograms = activation_tensors(run)
    path = config.data.stats
    key = run_key(run) if path or keyed else {}
    if path:
        cached = load_stats(path, key, layers, tensors, histograms)
        if cached is not None:
            return cached
    with progress(None, "reading calibration data") if progress else NoProgress():
        samples = data.samples  # decoded and validated once, here
    observer = HistogramObserver(tensors, None if histograms else (), attention_mask_name(data.inputs))
    if gram and layers:
        with (progress(samples, "calibrating") if progress else NoProgress()) as bar:
            stats = calibrate(run.model, layers, data.calibration(), on_batch=bar.update,
                              observers=[observer] if tensors else [])
    else:
        stats = {}
        if tensors:
            capture(run.model, data.calibration(), [observer])
    statistics = Statistics(stats, observer.hists, key, histograms)
    if path:
        save_stats(path, statistics)
    return statistics


def run_key(run: Run) -> dict:
    """The key of the run's statistics (model as prepared, data, preprocessing, calib size, layers); the --stats
    file itself is left out of a calibration folder's identity."""
    if "bias_slots" in vars(run):
        raise OnnxqError("measure or check statistics before rounding or building the loss oracle (run.calibrate() "
                         "first): those add zero biases to the model that the statistics' key hashes")
    stats = run.config.data.stats
    key, _ = statistics_key(run.model, run.layers, run.data.identity(), run.data.inputs, run.config,
                            [stats] if stats else [])
    return key


def activation_tensors(run: Run) -> tuple[list[str], bool]:
    """The tensors whose activation statistics a run needs (none without activation quantization) and whether it
    needs their histograms (every method but ``minmax``)."""
    if act_bits(run.config) is None or not run.layers:
        return [], False
    if prefer(run.config) == "speed":  # the W8A8 layers are known only after CLADO: every tensor a plan may need
        tensors = calibration_candidates(run.model, run.layers)
    else:
        tensors = plan_qdq(run.model, run.layers, [layer.name for layer in run.layers]).calibrated
    return tensors, run.config.activations.method != "minmax"


def checked_statistics(run: Run, statistics: Statistics) -> Statistics:
    """Statistics given to a run, checked against it: the same model, data, preprocessing, ``--calib-size`` and
    layers (their key), and the activations it quantizes."""
    difference = key_difference(statistics.key, run_key(run))
    if difference:
        raise OnnxqError(f"the statistics do not fit this run: {difference}; calibrate with the same model, data "
                         "and config")
    tensors, histograms = activation_tensors(run)
    if not statistics.covers(tensors, histograms):
        raise OnnxqError("the statistics hold no activation histograms for this run's --act-bits 8; calibrate with "
                         "activations=Activations(bits=8) (and the same act method) in the config")
    return statistics


def held_out_needed(config: Config) -> int:
    """Samples to keep beyond the calibration ones: CLADO's oracle and its verification with a budget, else
    one batch to check the written model on."""
    check = max(config.data.batch_size, check_samples(config.data.preprocessing))
    if config.mixed is not None:
        return max(config.mixed.samples, verify_samples(config), check)
    return check


def weight_symmetric(bits: int, config: Config) -> bool:
    """With activation quantization, 8-bit weights are symmetric: onnxruntime's integer kernels need zero point 0."""
    return bool(config.rounding.symmetric) or (act_bits(config) is not None and bits == 8)


def activation_layers(layers: list[Layer], results: dict[str, QuantWeight], config: Config) -> list[str]:
    """The layers whose inputs get uint8 Q/DQ: all of them, or with ``prefer="speed"`` the 8-bit ones only
    (W8A8 runs in integer kernels; a 2-4-bit weight has no integer kernel and stays weight-only in float)."""
    if prefer(config) == "speed":
        return [layer.name for layer in layers if results[layer.name].grid.bits == 8]
    int2 = {layer.name for layer in layers if results[layer.name].grid.bits == 2}
    if int2:  # onnxruntime fuses Q/DQ around a Conv/MatMul into QLinear kernels, which take no INT2 weight
        log.info("%d layer(s) at 2 bits keep float activations (onnxruntime has no kernel for INT2 weights with "
                 "uint8 activations): %s", len(int2), ", ".join(sorted(int2)[:5]))
    return [layer.name for layer in layers if layer.name not in int2]


def add_activations(run: Run, quantized: GraphModel, statistics: Statistics, act_layers: list[str]) -> None:
    """Edit ``quantized``: uint8 activation Q/DQ around the given layers, ranges from the float model's
    histograms (collected with the Gram statistics, in one capture pass)."""
    config = run.config
    if act_bits(config) != 8:
        raise OnnxqError(f"--act-bits {act_bits(config)} is not supported; use --act-bits 8")
    if not act_layers:
        log.warning("no layer is at 8 bits, so none runs in integer kernels; the model stays weight-only")
        return
    plan = plan_qdq(run.model, run.layers, act_layers)
    hists = {tensor: statistics.activations[tensor] for tensor in plan.calibrated}
    ranges = ranges_from(hists, config.activations.method, methods={t: "minmax" for t in plan.exact})
    add_activation_qdq(quantized, run.layers, ranges, act_layers)


def layer_block_size(layer: Layer, config: Config) -> int | None:
    """Block-wise scales apply to 2-D weights (MatMul, Gemm); Conv layers stay per channel."""
    block_size = config.rounding.block_size
    if block_size is not None and block_size < 1:
        raise OnnxqError(f"block size must be positive, not {block_size}")
    return block_size if block_size and len(layer.shape) == 2 else None


def with_bias_slots(model: onnx.ModelProto, layers: list[Layer], config: Config
                    ) -> tuple[onnx.ModelProto, dict[str, BiasSlot]]:
    """With bias correction on, the model with a zero bias on bias-less Conv/Gemm layers (a new model; the
    input is not changed) and the layers whose bias can absorb the error mean; else the model and no slots."""
    if not config.rounding.bias_correction:
        return model, {}
    model = with_zero_biases(model, layers)
    return model, bias_slots(model, layers)


def layer_gram(layer: Layer, stats: LayerStats, centred: bool, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix a pass rounds against (centred with bias correction, shrunk when its rows are few) and
    the calibration Gram its error is reported on."""
    measured = stats.centred_gram if centred else stats.normalised_gram
    if not config.rounding.shrinkage:
        return measured, measured
    H, rho = shrink_gram(measured, stats.rows)
    if rho:
        log.debug("%s: Gram matrix from %d rows shrunk towards its diagonal (rho %.3f)", layer.name, stats.rows, rho)
    return H, measured


def round_candidates(model: onnx.ModelProto, layers: list[Layer], stats: dict[str, LayerStats],
                     widths: dict[str, tuple[int, ...]], config: Config, progress: Callable | None,
                     slots: dict[str, BiasSlot] | None = None) -> dict[tuple[str, int], tuple[QuantWeight, float]]:
    """Round every layer at each of its widths; returns ``(layer, bits) -> (codes, relative error)``.

    Layers in ``slots`` are rounded against their centred Gram matrix and get the bias shift that completes it.
    """
    method, clip, jobs = config.rounding.method, config.rounding.clip, config.rounding.jobs
    if method not in ROUNDING_PASSES:
        raise OnnxqError(f"unknown method {method!r}; choose one of {', '.join(ROUNDING_PASSES)}")
    slots = slots or {}
    graph = GraphModel(model)
    tasks, matrices = [], {}
    for layer in layers:
        W = matrices[layer.name] = layer.matrix(graph.array(layer.weight)).astype(np.float64)
        H, measured = layer_gram(layer, stats[layer.name], layer.name in slots, config)
        block = layer_block_size(layer, config)
        tasks += [RoundingTask((layer.name, b), W, H, Grid(b, weight_symmetric(b, config), block),
                               {"clip": clip}, None if H is measured else measured)
                  for b in widths[layer.name]]
    check_rounding_inputs(tasks)
    with (progress(len(tasks), f"{method} rounding") if progress else NoProgress()) as bar:
        rounded = round_all(tasks, method, jobs, on_done=lambda: bar.update(1))
    for (name, _), (qw, _) in rounded.items():
        if name in slots:
            qw.bias_shift = output_shift(matrices[name], qw.dequantize(), stats[name].mean)
    return rounded


def round_sequential(model: onnx.ModelProto, layers: list[Layer], bits: dict[str, int], feeds: Iterable[Feed],
                     config: Config, progress: Callable | None,
                     slots: dict[str, BiasSlot]) -> dict[str, tuple[QuantWeight, float]]:
    """Round the layers stage by stage on the inputs of the model quantized so far (``sequential.py``);
    returns the quantized weights with their errors."""
    rounding = config.rounding
    if rounding.method not in ROUNDING_PASSES:
        raise OnnxqError(f"unknown method {rounding.method!r}; choose one of {', '.join(ROUNDING_PASSES)}")

    def round_stage(work: list) -> dict[str, tuple[QuantWeight, float]]:
        tasks = []
        for layer, target, S, rows in work:
            H, rho = shrink_gram(S, rows) if rounding.shrinkage else (S, 0.0)
            b = bits[layer.name]
            tasks.append(RoundingTask(layer.name, target, H, Grid(b, weight_symmetric(b, config),
                                      layer_block_size(layer, config)), {"clip": rounding.clip},
                                      S if rho else None))
        check_rounding_inputs(tasks)
        return round_all(tasks, rounding.method, rounding.jobs)

    with (progress(len(layers), f"sequential {rounding.method} rounding") if progress else NoProgress()) as bar:
        return round_sequentially(model, layers, feeds, round_stage, slots, on_stage=bar.update)


def layer_reports(layers: list[Layer], chosen: dict[str, tuple[QuantWeight, float]]) -> list[LayerReport]:
    """The per-layer table rows for the chosen quantized weights."""
    return [LayerReport(layer.name, layer.op_type, layer.shape, chosen[layer.name][0].grid.bits,
                        container_bits(layer, chosen[layer.name][0].grid.bits), chosen[layer.name][1], layer.params,
                        block_scale_bits(layer, chosen[layer.name][0].grid))
            for layer in layers]


def verify(path: Path, reference: onnx.ModelProto, feed: Feed | None
           ) -> tuple[float | None, float | None, float | None]:
    """Load the written model in onnxruntime and run it; return output SQNR (dB), top-1 agreement and mean KL
    (both for a classifier's [N, classes] output, as ``onnxq eval`` measures them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings are coloured multi-line text; errors come here
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise OnnxqError(f"the written model does not load in onnxruntime ({first_line(err)}); "
                         "please report this") from err
    if feed is None:
        return None, None, None
    quantized = session.run(None, feed)[0].astype(np.float64)
    expected = make_session(reference).run(None, feed)[0].astype(np.float64)
    noise = float(((quantized - expected) ** 2).sum())
    sqnr = 10 * np.log10(float((expected**2).sum()) / noise) if noise > 0 else float("inf")
    agreement = kl = None
    if expected.ndim == 2 and expected.shape[1] > 1:
        agreement = float((quantized.argmax(1) == expected.argmax(1)).mean())
        expected_log = log_softmax(expected)
        kl = float((np.exp(expected_log) * (expected_log - log_softmax(quantized))).sum(1).mean())
    return sqnr, agreement, kl


def check_batch(data: CalibrationSet) -> tuple[Feed | None, bool]:
    """The batch the written model is checked on (held out when the data has one), or None without data."""
    try:
        return data.check_batch()
    except OnnxqError:  # statistics came from a cache and the calibration source is gone: check loading only
        return None, False


def run_outputs(config: Config, output: Path | None = None) -> dict[str, Path | None]:
    """The files a run writes, by the flag that names them (checked before any work)."""
    mixed = config.mixed
    return {"-o": output, "--stats": config.data.stats,
            "--sensitivity-cache": mixed.sensitivity_cache if mixed is not None else None,
            "--bits-json": config.layers.bits_json if mixed is not None else None}


def quantize_model(model_path: str | Path, calib: object, output: str | Path, config: Config,
                   progress: Callable | None = None, statistics: Statistics | None = None,
                   plan: MixedPlan | None = None) -> QuantizationResult:
    """Quantize ``model_path`` with calibration data ``calib`` and write ``output``, as ``config`` says; with
    ``statistics`` (from ``onnxq.calibrate``) and a ``plan`` (from ``onnxq.allocate``) those stages are skipped."""
    output = Path(output)
    with opened(model_path, calib, config, run_outputs(config, output)) as run:
        return quantize_run(run, output, progress, statistics, plan)


def allocate_run(run: Run, progress: Callable | None, statistics: Statistics | None = None) -> MixedPlan:
    """The allocation stage alone: CLADO's widths under the config's budget."""
    if run.config.mixed is None:
        raise OnnxqError("allocating widths needs a budget: give the config mixed=MixedPrecision(avg_bits=...) "
                         "(or size_mb, size_ratio)")
    if not run.layers:
        raise nothing_to_quantize(run.skipped)
    statistics = checked_statistics(run, statistics) if statistics is not None else collect_statistics(run, progress)
    slots = run.bias_slots  # first: it gives run.model its zero biases
    plan, _ = mixed_precision(run.model, run.model_path, run.layers, statistics.layers, run.data, run.config,
                              progress, slots, keep_weights=False, edges=run.edge_layers)
    return plan


def planned_bits(plan: MixedPlan, layers: list[Layer]) -> dict[str, int]:
    """The widths of a given plan, which must name exactly these layers."""
    names = {layer.name for layer in layers}
    if set(plan.bits) != names:
        unknown = sorted(set(plan.bits) ^ names)
        raise OnnxqError(f"the bit plan does not fit this model's layers (e.g. {unknown[0]}); allocate it with the "
                         "same model and config")
    return dict(plan.bits)


def quantize_run(run: Run, output: Path, progress: Callable | None, statistics: Statistics | None = None,
                 plan: MixedPlan | None = None) -> QuantizationResult:
    """Calibrate, round (fixed widths, CLADO or sequential), export and check: the stages after loading."""
    config, model, layers, data = run.config, run.model, run.layers, run.data
    sequential = config.rounding.sequential and bool(layers)
    allocating = config.mixed is not None and plan is None
    if statistics is not None:
        statistics = checked_statistics(run, statistics)
    elif layers:  # sequential rounding captures its Gram statistics stage by stage
        statistics = collect_statistics(run, progress, gram=not sequential or allocating)
    else:
        statistics = Statistics({})
    stats = statistics.layers
    overrides = bits_overrides(layers, config)
    bits = planned_bits(plan, layers) if plan is not None else layer_bits(layers, config, overrides,
                                                                             run.edge_layers)
    slots = run.bias_slots
    model = run.model  # with the zero biases the slots added
    samples = statistics.samples if stats else (data.samples if sequential else 0)
    if allocating:  # with --sequential, the allocations it compares and the one it keeps are rounded sequentially
        plan, chosen = mixed_precision(model, run.model_path, layers, stats, data, config, progress, slots,
                                       edges=run.edge_layers)
    elif sequential:
        feeds = data.calibration_batches()  # read back on every pass, one batch in memory at a time
        chosen = round_sequential(model, layers, bits, feeds, config, progress, slots)
    else:
        rounded = round_candidates(model, layers, stats, {n: (b,) for n, b in bits.items()}, config, progress,
                                   slots)
        chosen = {name: rounded[(name, b)] for name, b in bits.items()}
    results = {name: qw for name, (qw, _) in chosen.items()}
    method = config.rounding.method
    metadata = {"onnxq.method": method, "onnxq.layers": layer_metadata(layers, results), **run.preprocessing_metadata}
    if sequential:
        metadata["onnxq.sequential"] = "1"  # rounded on the quantized model's inputs (see sequential.py)
    if plan is not None:
        metadata["onnxq.mixed_precision"] = json.dumps({
            "estimator": plan.estimator, "status": plan.status, "gap": plan.gap,
            "predicted_loss": plan.predicted_loss, "prefer": plan.prefer,
            "verified": plan.verified, "picked": plan.picked, "integer_mac_share": plan.integer_mac_share})
    export = config.export
    graph = quantized_graph(model, layers, results, metadata, export.matmul_nbits,
                            export.accuracy_level or DEFAULT_ACCURACY_LEVEL)
    if act_bits(config) is not None and layers:
        add_activations(run, graph, statistics, activation_layers(layers, results, config))
    quantized = graph.to_proto()  # every export edit above, serialised once
    check_feed, held_out = check_batch(data)
    layout = run.external if export.external_data is None and run.external else export.external_data
    with progress(None, "writing and checking the model") if progress else NoProgress():
        with staged_model(quantized, output, layout) as (staged, _):  # checked under its temporary name
            sqnr, agreement, kl = verify(staged, model, check_feed)
    bits_json = config.layers.bits_json
    if plan is not None and config.mixed is not None and bits_json:  # written once the model passed its check
        write_bits_json(bits_json, layers, plan.bits)
    method = f"{method}, sequential" if sequential else method
    result = QuantizationResult(output, method, layer_reports(layers, chosen), run.skipped,
                                _file_size(run.model_path), _file_size(output), samples, sqnr, agreement, plan,
                                check_held_out=held_out, check_kl=kl)
    advise(result, stats, config, sequential, run.edge_layers)
    return result


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
                    data: CalibrationSet, config: Config, progress: Callable | None,
                    slots: dict[str, BiasSlot] | None = None, keep_weights: bool = True, edges: list[str] = ()
                    ) -> tuple[MixedPlan, dict[str, tuple[QuantWeight, float]]]:
    """CLADO: round every candidate width, measure sensitivities, allocate under the budget; returns the plan
    and (``keep_weights``) the weights it picked. ``edges``: the layers --first-last-bits fixes."""
    mixed, first_last, sequential = config.mixed, config.layers.first_last_bits, config.rounding.sequential
    choices = tuple(sorted(set(mixed.bit_choices)))
    fixed = set(edges or (layers[0].name, layers[-1].name)) if first_last else set()
    widths = {layer.name: (first_last,) if layer.name in fixed else choices for layer in layers}
    widths.update({name: (b,) for name, b in config.layers.bits_per_layer.items()})
    candidates = round_candidates(model, layers, stats, widths, config, progress, slots)

    warned: list[bool] = []  # the sensitivity and the verification oracle share one fallback warning

    def oracle(samples: int = mixed.samples) -> LossOracle:
        feeds = oracle_feeds(data, samples, warn=not warned)
        warned.append(True)
        return LossOracle(model, layers, feeds, slots=slots)

    float_bytes = _file_size(model_path)
    fixed_bytes = unquantized_bytes(model, layers, {name: candidates[(name, w[0])][0] for name, w in widths.items()})
    fingerprint = (sensitivity_fingerprint(model, layers, data.identity(), data.inputs, config)
                   if mixed.sensitivity_cache else "")
    per_layer = [widths[layer.name] for layer in layers]
    shrinkage = "+shrinkage" if config.rounding.shrinkage else ""
    method = config.rounding.method + ("+bias_correction" if slots else "") + shrinkage
    method += "+held_out"  # sensitivities on samples the statistics did not use
    method += "+estimated_widths" if mixed.sensitivity != "exact" else ""  # clado.measured_widths
    key = cache_key(fingerprint, per_layer, method, mixed.sensitivity, mixed.samples)
    macs = layer_macs(layers, stats) if prefer(config) == "speed" else None
    rounded_sequentially: dict[tuple, dict[str, tuple[QuantWeight, float]]] = {}
    feeds = data.calibration_batches()  # read back on each sequential rounding

    def sequential_weights(bits: dict[str, int]) -> dict[str, tuple[QuantWeight, float]]:
        """One allocation rounded sequentially (what --sequential exports), remembered for the final choice."""
        key = tuple(sorted(bits.items()))
        if key not in rounded_sequentially:
            rounded_sequentially[key] = round_sequential(model, layers, bits, feeds, config, progress, slots)
        return rounded_sequentially[key]

    plan = sensitivity_and_allocation(oracle, layers, {k: qw for k, (qw, _) in candidates.items()}, per_layer,
                                      budget_of(config), mixed.sensitivity, fixed_bytes, float_bytes,
                                      mixed.sensitivity_cache, key, mixed.time_limit, progress, macs,
                                      (lambda: oracle(verify_samples(config))) if verify_samples(config) else None,
                                      (lambda bits: {n: qw for n, (qw, _) in sequential_weights(bits).items()})
                                      if sequential else None, {k: err for k, (_, err) in candidates.items()},
                                      cluster_of(config))
    if not keep_weights:
        return plan, {}
    if sequential:
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
