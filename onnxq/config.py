"""One frozen, nested, typed configuration for a quantization run, validated once.

Every option is written once, as a dataclass field whose metadata holds its CLI flag, hidden ORT-style aliases,
help, choices and range; the CLI (``onnxq.cli``) is generated from it and the keyword form of
``onnxq.quantize(..., bits=4)`` is mapped through it. Two sections exist only when asked for: ``mixed`` (a
budget) and ``activations`` (``--act-bits``), so their options cannot be given and then ignored. Combinations
that would be ignored, or would silently change another option, raise :class:`OnnxqError` saying what to do.

This module imports nothing heavy (no numpy, onnx or onnxruntime): ``onnxq --help`` is built from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from onnxq.data.images import ImagePreprocessing

# The vocabularies below are the ones the passes and the pipeline implement (tests/test_config.py checks that they
# match onnxq.passes, onnxq.graph.layers, onnxq.allocation.mixed and onnxq.calibration.activations); they are
# repeated here so that building the CLI imports none of those modules.
WIDTHS = (2, 3, 4, 8)
METHODS = ("comq", "gptq", "rtn")
OP_TYPES = ("Conv", "Gemm", "MatMul")
ESTIMATORS = ("fast", "exact", "diagonal")
ACT_METHODS = ("mse", "percentile", "minmax")
PREFERENCES = ("size", "speed")
BLOCK_SIZES = (16, 32, 64, 128)
BUDGET_FLAGS = ("--avg-bits", "--size-mb", "--size-ratio")
DEFAULT_BITS = 4  # --bits without a budget
DEFAULT_VERIFY_SAMPLES = 512  # --verify-samples where verification applies
DEFAULT_ACCURACY_LEVEL = 0  # MatMulNBits computes in float, as the file says
README = "see README.md, section"


def option(default: Any = None, help: str = "", flag: str | None = None, *, kind: str = "str",
           choices: tuple = (), aliases: tuple[str, ...] = (), off: str | None = None,
           minimum: float | None = None, maximum: float | None = None, shown: str | None = None,
           nullable: bool | None = None, default_factory: Any = MISSING) -> Any:
    """A config field with everything the CLI, the keyword API and validation need, written once.

    kind: bool, int, float, str, path, names (a tuple of strings, repeatable and comma-separated) or widths
    (a tuple of bit widths, comma-separated); ``off`` is the negative spelling of a bool flag; ``shown`` is
    the default as --help words it when the field's default is None (resolved later); ``minimum`` is
    exclusive for floats and inclusive for ints; ``nullable`` (default: when the default is None) says whether
    None is a valid value.
    """
    meta = {"flag": flag, "help": help, "kind": kind, "choices": choices, "aliases": aliases, "off": off,
            "minimum": minimum, "maximum": maximum, "shown": shown,
            "nullable": default is None if nullable is None else nullable}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Sections normalise plain values (str paths, lists, dicts) into their fields' types on construction."""

    def __post_init__(self) -> None:
        section = next(name for name, cls in SECTIONS.items() if isinstance(self, cls))
        for spec in OPTIONS.values():
            if spec.section == section:
                object.__setattr__(self, spec.attr, _normalise(spec, getattr(self, spec.attr)))


@dataclass(frozen=True)
class Rounding(_Section):
    """How each layer's weights are rounded (README: What a run does, step 3)."""

    method: str = option("comq", "Rounding pass: comq (coordinate descent, most accurate), gptq, or rtn "
                         "(round to nearest).", "--method", choices=METHODS)
    symmetric: bool | None = option(None, "Symmetric grids (zero point 0, onnxruntime's default) or asymmetric "
                                    "(more accurate). With --act-bits 8, 8-bit weights are symmetric.",
                                    "--symmetric", kind="bool", off="--asymmetric",
                                    shown="asymmetric; symmetric for 8-bit weights with --act-bits 8")
    clip: bool = option(True, "Search a per-channel clipping range that minimises the weight MSE before "
                        "rounding.", "--clip", kind="bool", off="--no-clip")
    bias_correction: bool = option(True, "Round against the centred input statistics and fold each layer's mean "
                                   "output error into its bias (Conv/Gemm, or the Add after a MatMul).",
                                   "--bias-correction", kind="bool", off="--no-bias-correction")
    shrinkage: bool = option(True, "Shrink input statistics estimated from few rows (e.g. a classifier after "
                             "global pooling) towards their diagonal (OAS), so rounding does not overfit the "
                             "calibration set.", "--shrinkage", kind="bool", off="--no-shrinkage")
    sequential: bool = option(False, "Round layer after layer on the inputs the already-quantized layers feed "
                              "it, towards the float model's outputs (most accurate, slower; "
                              f"{README} 'What a run does').", "--sequential", kind="bool", off="--no-sequential")
    block_size: int | None = option(None, "One scale and zero point per block of this many inputs of each "
                                    "MatMul/Gemm weight (Conv layers stay per channel).", "--block-size",
                                    kind="int", choices=BLOCK_SIZES, aliases=("--block_size",),
                                    shown="one scale per output channel")
    jobs: int | None = option(None, "Worker processes for rounding (API only; default: all cores).",
                              kind="int", minimum=1)


@dataclass(frozen=True)
class Layers(_Section):
    """Which layers are quantized, and at which widths when no budget chooses them."""

    bits: int | None = option(None, "Weight width of every layer. 3-bit codes are stored in INT4 with the range "
                              "[-4, 3]. With a budget, CLADO chooses from --bit-choices instead.", "--bits",
                              kind="int", choices=WIDTHS, shown=str(DEFAULT_BITS))
    first_last_bits: int | None = option(None, "Width of the layers at the model's edges (the most sensitive), "
                                         "e.g. 8: every layer reading a graph input and every layer whose output "
                                         "reaches a graph output without another weighted layer between (each "
                                         "head of a multi-output model).", "--first-last-bits", kind="int",
                                         choices=WIDTHS)
    bits_per_layer: Mapping[str, int] = option(help="Width of named layers, over the others (API only).",
                                               kind="widths_by_layer", default_factory=dict)
    bits_json: Path | None = option(None, "With a budget: write the chosen widths here (also in "
                                    "TensorQuantOverrides form). Without: read per-layer widths from this file.",
                                    "--bits-json", kind="path")
    nodes_to_exclude: tuple[str, ...] = option((), "Node names or regular expressions to keep in float (repeat "
                                               "or separate with commas).", "--nodes-to-exclude", kind="names",
                                               aliases=("--nodes_to_exclude",))
    op_types_to_quantize: tuple[str, ...] = option(OP_TYPES, "Op types to quantize (repeat or separate with "
                                                   "commas).", "--op-types-to-quantize", kind="names",
                                                   choices=OP_TYPES, aliases=("--op_types_to_quantize",))
    allow_empty: bool = option(False, "Write the model unchanged if it has nothing to quantize.", "--allow-empty",
                               kind="bool")


@dataclass(frozen=True)
class MixedPrecision(_Section):
    """CLADO: one width per layer under a budget (exactly one of avg_bits, size_mb, size_ratio).

    README: Mixed precision (CLADO).
    """

    avg_bits: float | None = option(None, "Mixed precision budget: average stored bits per weight (3-bit counts "
                                    "as 4, as stored).", "--avg-bits", kind="float", minimum=0)
    size_mb: float | None = option(None, "Mixed precision budget: output file size in MB.", "--size-mb",
                                   kind="float", minimum=0)
    size_ratio: float | None = option(None, "Mixed precision budget: output size as a fraction of the float file, "
                                      "e.g. 0.12.", "--size-ratio", kind="float", minimum=0)
    bit_choices: tuple[int, ...] = option((2, 3, 4, 8), "Widths CLADO may give each layer.", "--bit-choices",
                                          kind="widths", choices=WIDTHS)
    sensitivity: str = option("fast", "Layer-interaction estimate: fast (single-layer runs + Fisher cross "
                              "terms), exact (every pair measured, slow), or diagonal (layers independent).",
                              "--sensitivity", choices=ESTIMATORS)
    samples: int = option(128, "Samples the sensitivities are measured on: those after the --calib-size "
                          "calibrated on (held out) when the data has them, else the first ones.",
                          "--clado-samples", kind="int", minimum=1)
    verify_samples: int | None = option(None, "Held-out samples on which the solver's allocation, the "
                                        "diagonal-only one and the widest uniform width that fits are measured; "
                                        "the lowest loss is kept. 0: no check.", "--verify-samples", kind="int",
                                        minimum=0, shown=f"{DEFAULT_VERIFY_SAMPLES}; none with --sensitivity diagonal "
                                                         "or --prefer speed")
    time_limit: float = option(10.0, "Seconds for the exact integer program; the optimality gap is reported if "
                               "it stops early.", "--clado-time-limit", kind="float", minimum=0)
    sensitivity_cache: Path | None = option(None, "Cache file for the sensitivity matrix, so another budget "
                                            "skips the measurement.", "--sensitivity-cache", kind="path")
    workers: int | None = option(None, "Measure the sensitivities in this many local worker processes, through "
                                 "Ray (pip install 'onnxq[distributed]').", "--workers", kind="int", minimum=1,
                                 shown="in this process")
    ray_address: str | None = option(None, "Measure the sensitivities on the Ray cluster at this address "
                                     "(host:port, or auto for the one `ray start` or RAY_ADDRESS names; "
                                     f"{README} 'Distributed measurement').", "--ray-address")


@dataclass(frozen=True)
class Activations(_Section):
    """uint8 activation Q/DQ, so onnxruntime runs 8-bit layers as integer kernels (W8A8)."""

    bits: int = option(8, "Also quantize activations to uint8: 8-bit layers become W8A8 (symmetric weights, "
                       "integer kernels); lower-bit layers become WnA8.", "--act-bits", kind="int", choices=(8,))
    method: str = option("mse", "How activation ranges are chosen.", "--act-method", choices=ACT_METHODS,
                         aliases=("--calibration_method",))
    prefer: str = option("size", "speed: only 8-bit layers get activation Q/DQ (integer kernels) and the others "
                         "stay weight-only; with a budget CLADO also favours 8 bits for the layers doing most "
                         "multiply-adds. size: every layer's activations are quantized and CLADO minimises the loss "
                         f"only ({README} 'Speed or size from one budget').", "--prefer", choices=PREFERENCES)


@dataclass(frozen=True)
class Data(_Section):
    """How calibration samples are read."""

    calib_size: int | None = option(256, "Use at most this many calibration samples (0: all); from a folder they "
                                    "are spread over the sorted file names, not the first ones.", "--calib-size",
                                    kind="int", minimum=0, nullable=True)  # None, as 0: all
    batch_size: int = option(16, "Samples per onnxruntime batch; memory is bounded by one batch.", "--batch-size",
                             kind="int", minimum=1)
    stats: Path | None = option(None, "Cache file for calibration statistics: reused when the model, the "
                                "calibration data, the preprocessing and --calib-size match, written otherwise, so a "
                                "second run with other bits skips calibration.",
                                "--stats", kind="path")
    preprocessing: ImagePreprocessing | None = option(None, "Image preprocessing (the CLI's --preprocess, "
                                                      "--image-size, --resize, --resize-mode, --mean, --std, "
                                                      "--scale, --channel-order).",
                                                      kind="preprocessing")


@dataclass(frozen=True)
class Export(_Section):
    """How the quantized model is written."""

    matmul_nbits: bool = option(False, "Write MatMul layers with 4-bit (or 3-bit) codes as onnxruntime's "
                                "com.microsoft.MatMulNBits (onnxruntime only); other layers keep "
                                f"DequantizeLinear ({README} 'Transformers').", "--matmul-nbits", kind="bool")
    accuracy_level: int | None = option(None, "MatMulNBits' accuracy_level: 0 computes in float, as the file says; "
                                        "4 lets onnxruntime quantize activations to int8.", "--accuracy-level",
                                        kind="int", minimum=0, maximum=4, aliases=("--accuracy_level",),
                                        shown=str(DEFAULT_ACCURACY_LEVEL))
    external_data: bool | None = option(None, "Store weights in <output>.data.", "--external-data", kind="bool",
                                        off="--no-external-data",
                                        shown="when the input keeps its weights there, or the output exceeds 2 GB")


SECTIONS: dict[str, type] = {"layers": Layers, "rounding": Rounding, "mixed": MixedPrecision,
                             "activations": Activations, "data": Data, "export": Export}
# The sections that exist only when asked for, and the options that ask for them.
TRIGGERS = {"mixed": ("avg_bits", "size_mb", "size_ratio"), "activations": ("act_bits",)}


@dataclass(frozen=True)
class Spec:
    """One option as the CLI and the keyword API see it: its flat name (the flag with underscores) and where it
    lives in the config."""

    name: str
    section: str
    attr: str
    default: Any
    flag: str | None
    help: str
    kind: str
    choices: tuple
    aliases: tuple[str, ...]
    off: str | None
    minimum: float | None
    maximum: float | None
    shown: str | None
    nullable: bool

    @property
    def label(self) -> str:
        """How error messages name the option: its flag, or its keyword when it has none."""
        return self.flag or self.name


def _specs() -> dict[str, Spec]:
    specs = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            meta = f.metadata
            default = f.default if f.default is not MISSING else f.default_factory()
            name = meta["flag"].lstrip("-").replace("-", "_") if meta["flag"] else f.name
            specs[name] = Spec(name, section, f.name, default, meta["flag"], meta["help"], meta["kind"],
                               meta["choices"], meta["aliases"], meta["off"], meta["minimum"], meta["maximum"],
                               meta["shown"], meta["nullable"])
    return specs


OPTIONS: dict[str, Spec] = _specs()  # flat name -> spec, in the order --help lists them


@dataclass(frozen=True)
class Config:
    """Everything a run can be told; ``mixed`` and ``activations`` are None unless asked for.

    Build it directly (``Config(mixed=MixedPrecision(avg_bits=3))``) or from flat keywords
    (``Config.from_options(bits=3, first_last_bits=8)``: the CLI flags with underscores); derive variants with
    ``dataclasses.replace`` or :meth:`with_options`. Construction validates the whole configuration.
    """

    rounding: Rounding = field(default_factory=Rounding)
    layers: Layers = field(default_factory=Layers)
    mixed: MixedPrecision | None = None
    activations: Activations | None = None
    data: Data = field(default_factory=Data)
    export: Export = field(default_factory=Export)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise OnnxqError(f"Config.{name} must be a {cls.__name__}, not {type(value).__name__}")
        for spec, value in self._values():
            _check_value(spec, value)
        for message in _conflicts(self):
            raise OnnxqError(message)

    def _values(self) -> Iterator[tuple[Spec, Any]]:
        for spec in OPTIONS.values():
            section = getattr(self, spec.section)
            if section is not None:
                yield spec, getattr(section, spec.attr)

    @classmethod
    def from_options(cls, **options: Any) -> Config:
        """A config from flat keywords: the CLI flags with underscores (``bits=3``, ``act_bits=8``, ...)."""
        return cls().with_options(**options)

    def with_options(self, **options: Any) -> Config:
        """A copy with the given flat keywords set. An optional section appears when an option that asks for it
        is set (a budget, ``act_bits``) and disappears when those are set to None; its other options without
        it are an error (``prefer`` without ``act_bits``, ``clado_samples`` without a budget)."""
        options = _legacy(dict(options))
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise OnnxqError(f"unknown option(s) {unknown}; valid options are {sorted(OPTIONS)}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            spec = OPTIONS[name]
            by_section.setdefault(spec.section, {})[spec.attr] = _normalise(spec, value)
        sections = {name: self._section_with(name, values) for name, values in by_section.items()}
        return replace(self, **sections)

    def _section_with(self, name: str, values: dict[str, Any]) -> Any:
        """Section ``name`` with ``values`` set; None for an optional section nothing asks for."""
        current = getattr(self, name)
        if name not in TRIGGERS:
            return replace(current, **values)
        triggers = [OPTIONS[t].attr for t in TRIGGERS[name]]
        merged = {**(vars(current) if current is not None else {}), **values}
        if all(merged.get(attr) is None for attr in triggers):
            others = [OPTIONS[n].label for n, s in OPTIONS.items()
                      if s.section == name and s.attr in values and values[s.attr] is not None]
            if others:
                raise OnnxqError(f"{', '.join(others)} {'needs' if len(others) == 1 else 'need'} "
                                 f"{_trigger_words(name)}")
            return None
        return replace(current if current is not None else SECTIONS[name](), **values)


def _trigger_words(section: str) -> str:
    if section == "mixed":
        return "a budget: add --avg-bits, --size-mb or --size-ratio"
    return "--act-bits 8 (activation quantization): add it"


def _legacy(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword form before the config took ``budget=Budget(avg_bits=3)``; it is the three budget options."""
    budget = options.pop("budget", None)
    if budget is not None:
        for name in TRIGGERS["mixed"]:
            if getattr(budget, name, None) is not None:
                options[name] = getattr(budget, name)
    return options


def _normalise(spec: Spec, value: Any) -> Any:
    """Plain Python values into the field's type: str paths into Path, lists into tuples, dicts into read-only
    mappings. Nothing else is converted; wrong types are caught by validation."""
    if value is None:
        return None
    if spec.kind == "path" and isinstance(value, str):
        return Path(value)
    if spec.kind in ("names", "widths") and isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(value)
        return tuple(sorted(set(items))) if spec.kind == "widths" else items
    if spec.kind == "names" and isinstance(value, str):
        return (value,)
    if spec.kind == "widths_by_layer" and isinstance(value, Mapping):
        return dict(value)  # a copy: the caller's dict may change later, the config's does not
    return value


def _check_value(spec: Spec, value: Any) -> None:
    """Types, choices and ranges of one option."""
    name = spec.label
    if value is None:
        if not spec.nullable:
            raise OnnxqError(f"{name} cannot be None")
        return
    if spec.kind == "bool" and not isinstance(value, bool):
        raise OnnxqError(f"{name} is true or false, not {value!r}")
    if spec.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise OnnxqError(f"{name} takes a whole number, not {value!r}")
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OnnxqError(f"{name} takes a finite number, not {value!r}")
    if spec.kind == "str" and not isinstance(value, str):
        raise OnnxqError(f"{name} takes one of {', '.join(map(str, spec.choices))}, not {value!r}")
    if spec.kind == "path" and not isinstance(value, Path):
        raise OnnxqError(f"{name} takes a file path, not {value!r}")
    if spec.kind in ("names", "widths") and not isinstance(value, tuple):
        raise OnnxqError(f"{name} takes a list, not {value!r}")
    items = value if spec.kind in ("names", "widths") else (value,)
    if spec.kind == "widths_by_layer":
        items = tuple(value.values())
        if not all(isinstance(k, str) for k in value):
            raise OnnxqError(f"{name} maps layer names to widths")
    choices = spec.choices or (WIDTHS if spec.kind == "widths_by_layer" else ())
    if choices and any(item not in choices for item in items):
        bad = next(item for item in items if item not in choices)
        raise OnnxqError(f"{name} must be among {', '.join(map(str, choices))}, not {bad!r}")
    if spec.kind in ("names", "widths") and spec.choices and not items:
        raise OnnxqError(f"{name} needs at least one of {', '.join(map(str, spec.choices))}")
    if spec.minimum is not None:
        low = value > spec.minimum if spec.kind == "float" else value >= spec.minimum
        if not low:
            bound = "positive" if spec.kind == "float" else f"at least {spec.minimum:g}"
            raise OnnxqError(f"{name} must be {bound}, not {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise OnnxqError(f"{name} must be at most {spec.maximum:g}, not {value!r}")
    if spec.kind == "names" and spec.attr == "nodes_to_exclude":
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise OnnxqError(f"{name} {pattern!r} is not a regular expression ({err})") from err


def _conflicts(config: Config) -> Iterator[str]:
    """Combinations that would be ignored or would silently change another option, each with what to do."""
    rounding, layers, mixed, acts, data, export = (config.rounding, config.layers, config.mixed, config.activations,
                                                   config.data, config.export)
    if mixed is not None:
        given = [flag for flag, v in zip(BUDGET_FLAGS, (mixed.avg_bits, mixed.size_mb, mixed.size_ratio),
                                         strict=True) if v is not None]
        if len(given) != 1:
            yield f"give one budget, not {' and '.join(given)}" if given else \
                  "mixed precision needs a budget: set one of avg_bits, size_mb or size_ratio"
        if layers.bits is not None:
            yield ("--bits sets one width for every layer, but with a budget CLADO chooses each layer's width "
                   "from --bit-choices: drop --bits (or the budget)")
        if mixed.verify_samples and mixed.sensitivity == "diagonal":
            yield ("--verify-samples compares the solver's allocation with the diagonal-only one, which "
                   "--sensitivity diagonal already is: drop --verify-samples (or use --sensitivity fast)")
        if mixed.verify_samples and acts is not None and acts.prefer == "speed":
            yield ("--verify-samples keeps the allocation with the lowest measured loss, which would undo "
                   "--prefer speed's trade of loss for integer kernels: drop --verify-samples")
    if data.stats is not None and rounding.sequential and mixed is None:
        yield ("--stats is not used by --sequential without a budget (it captures its statistics stage by "
               "stage): drop --stats")
    if export.accuracy_level is not None and not export.matmul_nbits:
        yield "--accuracy-level needs --matmul-nbits (it is the MatMulNBits kernel's setting): add --matmul-nbits"
    if export.matmul_nbits and "MatMul" not in layers.op_types_to_quantize:
        yield "--matmul-nbits writes MatMul layers, but --op-types-to-quantize leaves them out: add MatMul"
    fixed_widths = {layers.bits or DEFAULT_BITS, layers.first_last_bits or layers.bits or DEFAULT_BITS}
    if export.matmul_nbits and mixed is None and not layers.bits_per_layer and layers.bits_json is None \
            and not fixed_widths & {3, 4}:
        yield (f"--matmul-nbits writes MatMul layers with 3- or 4-bit codes, and --bits {layers.bits} gives none: "
               "drop --matmul-nbits or use --bits 4")
    if rounding.block_size is not None and set(layers.op_types_to_quantize) <= {"Conv"}:
        yield "--block-size applies to MatMul and Gemm weights (Conv stays per channel): add them or drop it"
    if rounding.symmetric is False and acts is not None:
        yield ("--asymmetric conflicts with --act-bits 8: onnxruntime's integer kernels need symmetric 8-bit "
               "weights, so onnxq makes them symmetric: drop --asymmetric")


def described(config: Config) -> dict[str, Any]:
    """The options that differ from the defaults, by flat name: what a run was told, and the inverse of
    :meth:`Config.from_options` (``Config.from_options(**described(c)) == c``)."""
    defaults = Config()
    out = {}
    for spec, value in config._values():
        base = getattr(defaults, spec.section) or SECTIONS[spec.section]()
        if getattr(base, spec.attr) != value or (value is not None and spec.name in TRIGGERS.get(spec.section, ())):
            out[spec.name] = value
    return out


__all__ = ["Activations", "Config", "Data", "Export", "Layers", "MixedPrecision", "OPTIONS", "Rounding", "Spec",
           "described"]
