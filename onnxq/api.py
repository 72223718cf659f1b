"""The Python API: ``onnxq.quantize(model, calib, output=None, config=Config(...))``, and its stages.

``model`` is a path or an ``onnx.ModelProto``; without ``output`` the quantized model comes back in memory
(``result.model``). Keyword options (the CLI flags with underscores: ``bits=3, first_last_bits=8``) are applied
on top of ``config``, so ``onnxq.quantize("m.onnx", "calib/", "q.onnx", bits=4)`` keeps working. The stages can
be run one at a time and their results reused::

    statistics = onnxq.calibrate(model, calib, config)             # Gram statistics (+ activation histograms)
    plan = onnxq.allocate(model, calib, config, statistics=statistics)  # CLADO's widths under the budget
    result = onnxq.quantize(model, calib, "q.onnx", config, statistics=statistics, plan=plan)
    onnxq.evaluate("q.onnx", model, "val/")                              # what `onnxq eval` prints
    onnxq.write_report("q.onnx", model, "val/", "report.html", plan=plan)  # the HTML report

The caller's config and model are never changed.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from onnxq.allocation.mixed import MixedPlan
from onnxq.calibration.stats_cache import Statistics
from onnxq.config import Config
from onnxq.errors import OnnxqError
from onnxq.pipeline import QuantizationResult, Run, allocate_run, opened, quantize_model, run_outputs
from onnxq.report.evaluate import EvalResult

ONNX_PROTO_LIMIT = 2**31 - 1  # protobuf's serialisation limit: larger models keep their weights in external data
BitPlan = MixedPlan  # the per-layer widths CLADO chose under the budget, with how it chose them

Model = str | Path | onnx.ModelProto


def quantize(model: Model, calib: object, output: str | Path | None = None, config: Config | None = None, *,
             statistics: Statistics | None = None, plan: BitPlan | None = None, progress: Callable | None = None,
             **options: Any) -> QuantizationResult:
    """Quantize ``model`` with calibration data ``calib`` (a path, a CalibrationDataReader or feed dicts).

    Writes ``output`` when given; otherwise the quantized model is returned as ``result.model``. ``options``
    override ``config`` by flat name (see :data:`onnxq.config.OPTIONS`); the caller's config is never changed.
    ``statistics`` (from :func:`calibrate`) and ``plan`` (from :func:`allocate`) skip those stages; they are
    checked against this model, data and config.
    """
    config = run_config(config, options)
    check_files(config)
    with model_file(model) as (model_path, scratch):
        target = Path(output) if output is not None else scratch / "quantized.onnx"
        result = quantize_model(model_path, calib, target, config, progress, statistics, plan)
        if output is None:
            return dataclasses.replace(result, output=None, model=onnx.load(str(target)))
    return result


def calibrate(model: Model, calib: object, config: Config | None = None, *, progress: Callable | None = None,
              **options: Any) -> Statistics:
    """Measure the statistics a run needs on ``calib``: each layer's Gram statistics and, with
    ``activations=Activations(bits=8)``, the activation histograms, in one pass over the float model. With
    ``stats=`` in the config a matching file is reused, else written; ``statistics.save(path)`` writes one too."""
    with open_run(model, calib, config, **options) as run:
        return run.calibrate(progress)


def allocate(model: Model, calib: object, config: Config | None = None, *, statistics: Statistics | None = None,
             progress: Callable | None = None, **options: Any) -> BitPlan:
    """CLADO's per-layer widths under the config's budget (``mixed=MixedPrecision(avg_bits=3)``): rounds every
    candidate width, measures sensitivities on held-out samples and solves for the allocation. ``statistics``
    from :func:`calibrate` skip the calibration pass."""
    with open_run(model, calib, config, **options) as run:
        return allocate_run(run, progress, statistics)


def evaluate(quantized: str | Path, reference: str | Path, data: str | Path, *, preprocessing: object = None,
             labels: str | Path | None = None, batch_size: int = 32, limit: int | None = None,
             progress: Callable | None = None) -> EvalResult:
    """What ``onnxq eval`` measures: agreement, KL and SQNR against the float ``reference`` on ``data`` (any layout
    ``calib`` accepts), and top-1/top-5 of both when labels are known."""
    from onnxq.report.evaluate import evaluate as evaluate_models

    return evaluate_models(Path(quantized), Path(reference), Path(data), preprocessing,
                           None if labels is None else Path(labels), batch_size, limit, progress)


def write_report(quantized: str | Path, reference: str | Path, data: str | Path, html: str | Path | None = None,
           json: str | Path | None = None, *, evaluation: EvalResult | dict | None = None, plan: BitPlan | None = None,
           curve: list[dict] | None = None, statistics: Statistics | None = None, preprocessing: object = None,
           samples: int = 16, **page: str) -> dict:
    """The HTML report (needs the ``report`` extra) and/or its JSON for one quantized model: per-layer widths, SQNR
    on ``samples`` of ``data`` and weight errors; ``plan`` adds CLADO's sensitivity heat map, ``curve`` (dicts with
    series, label, size_bytes, avg_bits and top1 or agreement) the accuracy-against-size curve, ``statistics`` the
    Gram-weighted error each layer's rounding minimised. ``page`` sets the title or description. Returns the
    report's context (what the JSON holds)."""
    from onnxq.report.html_report import require_matplotlib, write_reports

    if html is not None:
        require_matplotlib()
    if isinstance(evaluation, EvalResult):
        evaluation = evaluation.as_dict()
    grams = None if statistics is None else {name: s.centred_gram for name, s in statistics.layers.items()}
    return write_reports(quantized, reference, Path(data), None if html is None else Path(html),
                         None if json is None else Path(json), evaluation=evaluation, plan=plan, curve=curve,
                         grams=grams, preprocessing=preprocessing, samples=samples, **page)


@contextmanager
def open_run(model: Model, calib: object, config: Config | None = None, **options: Any) -> Iterator[Run]:
    """The prepared model, its layers and calibration set of one run, for working below the stages (studies of
    the method): ``run.calibrate()``, ``run.round(widths, statistics)``, ``run.loss_oracle(samples)``."""
    config = run_config(config, options)
    with model_file(model) as (model_path, _), opened(model_path, calib, config, run_outputs(config)) as run:
        yield run


@contextmanager
def model_file(model: Model) -> Iterator[tuple[Path, Path]]:
    """The model as a file the pipeline can read, and a scratch folder (both gone on exit)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-") as scratch:
        folder = Path(scratch)
        yield (saved_proto(model, folder) if isinstance(model, onnx.ModelProto) else Path(model)), folder


def run_config(config: Config | None, options: dict[str, Any]) -> Config:
    """The config of a call: ``config`` (default: the defaults) with keyword options applied on top."""
    if config is not None and not isinstance(config, Config):
        raise OnnxqError(f"config must be an onnxq.Config, not {type(config).__name__}")
    config = config or Config()
    return config.with_options(**options) if options else config


def check_files(config: Config) -> None:
    """Input files the config names must exist (an absent one would be silently skipped by the run)."""
    bits_json = config.layers.bits_json
    if bits_json is not None and config.mixed is None and not bits_json.is_file():
        raise OnnxqError(f"--bits-json {bits_json} does not exist: without a budget it is read (write it first "
                         "with a budget, e.g. --avg-bits 3)")


def saved_proto(model: onnx.ModelProto, folder: Path) -> Path:
    """Write an in-memory model where the pipeline can read it (weights in external data past 2 GB)."""
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise OnnxqError("the ModelProto refers to external data files it does not hold; load it with "
                         "onnx.load(path) (which reads them) or pass the model's path")
    path = folder / "model.onnx"
    if model.ByteSize() <= ONNX_PROTO_LIMIT:
        onnx.save_model(model, str(path))
        return path
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving as external data rewrites the tensors it moves: not the caller's model
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    return path
