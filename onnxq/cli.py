"""The ``onnxq`` command line: ``onnxq MODEL --calib DATA -o OUT`` (the ``quantize`` subcommand is implied).

The quantize command's options are generated from :mod:`onnxq.config`; heavy modules (onnxruntime, scipy)
are imported inside the commands, so ``onnxq --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from onnxq import __version__
from onnxq.config import OPTIONS, TRIGGERS, Config, Spec
from onnxq.errors import OnnxqError
from onnxq.report.progress import progress_factory

if TYPE_CHECKING:
    from onnxq.data.images import ImagePreprocessing


class DefaultToQuantize(click.Group):
    """A group where ``onnxq MODEL ...`` means ``onnxq quantize MODEL ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["quantize", *args]
        return super().parse_args(ctx, args)


def split_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """Accept repeated flags and comma- or space-separated lists alike."""
    return tuple(item for value in values for item in value.replace(",", " ").split() if item)


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as err:
        raise click.BadParameter(f"{name} takes numbers separated by commas, e.g. 0.485,0.456,0.406") from err


def parse_size(text: str | None) -> tuple[int, int] | int | None:
    """``256`` (short side) or ``256x256`` (height x width)."""
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError as err:
        raise click.BadParameter("sizes look like 256 or 256x256") from err
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_widths(text: str, flag: str) -> tuple[int, ...]:
    """``2,3,4,8`` -> (2, 3, 4, 8); the config checks that each is a supported width."""
    try:
        return tuple(sorted({int(v) for v in text.replace(",", " ").split()}))
    except ValueError as err:
        raise click.BadParameter(f"{flag} takes widths such as 2,3,4,8") from err


def image_preprocessing(image_size, resize, mean, std, scale, channel_order, preprocess=None,
                        resize_mode=None) -> ImagePreprocessing | None:
    """Build the preprocessing from the flags; unset fields come from the preset, the model's metadata or
    torchvision (``ImagePreprocessing.completed``)."""
    from onnxq.data.images import ImagePreprocessing

    fields: dict[str, Any] = {"preset": preprocess, "resize_mode": resize_mode} if preprocess or resize_mode else {}
    size = parse_size(image_size)
    if size is not None:
        fields["size"] = (size, size) if isinstance(size, int) else size
    if resize is not None:
        fields["resize"] = parse_size(resize)
    if mean is not None:
        fields["mean"] = parse_floats(mean, "--mean")
    if std is not None:
        fields["std"] = parse_floats(std, "--std")
    if scale is not None:
        fields["scale"] = scale
    if channel_order is not None:
        fields["channel_order"] = channel_order
    return ImagePreprocessing(**fields) if fields else None


PRESET_NAMES = ("torchvision", "caffe", "inception", "tflite", "unit", "none")  # onnxq.data.presets.PRESETS
PREPROCESSING_OPTIONS = [
    click.option("--preprocess", type=click.Choice(PRESET_NAMES), default=None,
                 help="Image preprocessing convention: torchvision (RGB, ImageNet mean/std), caffe (BGR minus "
                      "104,117,123, 256x256), inception (RGB in [-1, 1]), tflite ((x - 127) / 128), unit (RGB in "
                      "[0, 1]) or none (0..255). The flags below change single values of it. [default: the "
                      "model's onnxq.preprocess metadata, else torchvision; README section 'Preprocessing']"),
    click.option("--image-size", default=None, help="Crop size HxW for image folders (default: the model input, "
                                                     "or its onnxq.image_size metadata when dynamic, else 224)."),
    click.option("--resize", default=None,
                 help="Resize before the centre crop: 256 (short side) or 256x256 (default: the preset's)."),
    click.option("--resize-mode", type=click.Choice(["crop", "letterbox"]), default=None,
                 help="crop: resize and centre-crop; letterbox: fit the whole image inside and pad with grey "
                      "(detectors). [default: crop]"),
    click.option("--mean", default=None, help="Per-channel mean subtracted after scaling [default: the preset's]."),
    click.option("--std", default=None, help="Per-channel std divided by [default: the preset's]."),
    click.option("--scale", type=float, default=None, help="Pixel multiplier applied first [default: the preset's]."),
    click.option("--channel-order", type=click.Choice(["RGB", "BGR"], case_sensitive=False), default=None,
                 help="Channel order the model expects [default: the preset's]."),
]


PREPROCESSING_NAMES = ("image_size", "resize", "mean", "std", "scale", "channel_order", "preprocess", "resize_mode")
CALIB_AUGMENT = click.option(
    "--calib-augment", type=click.IntRange(min=0), default=None, metavar="N",
    help="Expand a folder of fewer than N images to N calibration samples: the images, then generated views "
         "(colour-jittered mosaics of random crops), the same on every run; further views are held out for the "
         "check. For a handful of images (README 'Calibration data').")


LOG_LEVELS = ("debug", "info", "warning", "error")


class LevelFormatter(logging.Formatter):
    """``onnxq: <message>`` for information, ``onnxq: warning: <message>`` (error, debug) for the others, so a
    line says how much it matters."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"onnxq: {prefix}{record.getMessage()}"


def log_level(argv: list[str]) -> int:
    """The level --log-level asks for (read before click parses, so that import-time messages obey it too);
    -q/--quiet alone means warning, the default is info."""
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--log-level=") else \
            (argv[index + 1] if arg == "--log-level" and index + 1 < len(argv) else None)
        if value and value.lower() in LOG_LEVELS:
            return getattr(logging, value.upper())
    return logging.WARNING if {"-q", "--quiet"} & set(argv) else logging.INFO


LOG_LEVEL_OPTION = click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                                help="Messages shown: debug, info (what the run decided, caches reused), warning "
                                     "or error.  [default: info; warning with -q]")


def preprocessing_options(command):
    """Add the image preprocessing flags shared by ``quantize`` and ``eval``."""
    for option in reversed(PREPROCESSING_OPTIONS):
        command = option(command)
    return command


@click.group(cls=DefaultToQuantize, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
def cli() -> None:
    """onnxq: post-training low-bit weight quantization for ONNX models.

    \b
    onnxq model.onnx --calib data/ -o model_int4.onnx
    """


class AliasedOption(click.Option):
    """An option whose ORT-style spellings (``--nodes_to_exclude``) work but are not listed in --help."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [name for name in shown if name not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def click_type(spec: Spec) -> click.ParamType:
    """The click type that parses a flag's text; ranges and combinations are checked by the config."""
    if spec.choices and spec.kind in ("int", "str"):
        return click.Choice([str(c) for c in spec.choices], case_sensitive=spec.kind != "str")
    return {"int": click.INT, "float": click.FLOAT, "path": click.Path(path_type=Path)}.get(spec.kind, click.STRING)


def shown_default(spec: Spec) -> str | None:
    """The default as --help words it (tuples as comma lists; conditional defaults in words)."""
    if spec.shown is not None:
        return spec.shown
    if spec.default in (None, False, ()):
        return None
    if isinstance(spec.default, tuple):
        return ",".join(map(str, spec.default))
    return "on" if spec.default is True else str(spec.default)


def config_option(spec: Spec) -> click.Option:
    """The click option for one config field, from its metadata alone."""
    flags = [f"{spec.flag}/{spec.off}"] if spec.off else [spec.flag]
    asks_for_section = any(spec.name in names for names in TRIGGERS.values())
    default = None if asks_for_section else shown_default(spec)  # --act-bits is off unless given
    kwargs: dict[str, Any] = {"help": spec.help + (f"  [default: {default}]" if default else ""), "default": None}
    if spec.kind == "bool":
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = click_type(spec)
        kwargs["multiple"] = spec.kind == "names"
        if spec.kind == "names" and spec.choices:
            kwargs["metavar"] = "|".join(spec.choices)
    return AliasedOption([spec.name, *flags, *spec.aliases], hidden_aliases=spec.aliases, **kwargs)


def flag_value(spec: Spec, value: Any) -> Any:
    """A parsed flag as the config field's value."""
    if spec.kind == "names":
        return split_list(value)
    if spec.kind == "widths":
        return parse_widths(value, spec.label)
    if spec.kind == "int" and spec.choices:
        return int(value)
    return value


def config_from_flags(ctx: click.Context, extra: dict[str, Any] | None = None) -> Config:
    """The Config the command line asks for: only the flags given on it (the others keep the config's defaults,
    so a flag that would be ignored is caught by the config's validation), plus ``extra`` fields."""
    given = {name: flag_value(OPTIONS[name], value) for name, value in ctx.params.items()
             if name in OPTIONS and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
    given.update(extra or {})
    preprocessing = image_preprocessing(*(ctx.params[name] for name in PREPROCESSING_NAMES))
    if ctx.params.get("calib_augment"):
        from onnxq.data.images import ImagePreprocessing

        preprocessing = dataclasses.replace(preprocessing or ImagePreprocessing(), augment=ctx.params["calib_augment"])
    if preprocessing is not None:
        given["preprocessing"] = preprocessing
    return Config.from_options(**given)


def run_quantize(model: Path, calib: Path, output: Path, kernel_report: bool, quiet: bool, debug: bool,
                 **flags: Any) -> None:
    """Quantize MODEL's Conv/Gemm/MatMul weights to 2, 3, 4 or 8 bits and write a QDQ ONNX model.

    Flags that belong together are checked before any work: a flag that would be ignored, or would change
    another one, is an error that says what to add or drop. README.md explains each stage and the measured
    effect of each option (sections "What a run does", "Mixed precision (CLADO)", "Benchmarks").
    """
    config = config_from_flags(click.get_current_context())
    from onnxq.api import quantize
    from onnxq.report.summary import kernel_table, layer_table, summary

    result = quantize(model, calib, output, config, progress=progress_factory(not quiet))
    if not quiet:
        click.echo(layer_table(result))
        click.echo(summary(result))
    if kernel_report:
        click.echo(kernel_table(model, result.output))


def quantize_command() -> click.Command:
    """The ``quantize`` command: its options are generated from :mod:`onnxq.config`, one per config field."""
    params: list[click.Parameter] = [
        click.Argument(["model"], type=click.Path(path_type=Path)),
        click.Option(["--calib"], required=True, type=click.Path(path_type=Path),
                     help="Calibration data: a folder of images, *.npy files, <input_name>/*.npy folders, .npz "
                          "files keyed by input name, or onnxruntime's test_data_set_*/input_*.pb layout."),
        click.Option(["-o", "--output"], required=True, type=click.Path(path_type=Path),
                     help="Where to write the quantized model (never the input file)."),
        *(config_option(spec) for spec in OPTIONS.values() if spec.flag),
    ]
    command = click.Command("quantize", callback=run_quantize, params=params, help=run_quantize.__doc__,
                            short_help="Quantize a model (the default command).")
    for decorate in (*PREPROCESSING_OPTIONS, CALIB_AUGMENT,
                     click.option("--kernel-report", is_flag=True,
                                  help="After writing, list the onnxruntime kernel each layer runs as and time "
                                       "float vs quantized (median latency at batch 1 and 32)."),
                     click.option("-q", "--quiet", is_flag=True,
                                  help="No progress, tables or information lines: warnings and errors only."),
                     LOG_LEVEL_OPTION,
                     click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")):
        command = decorate(command)  # on a Command, click.option appends: the order above is the --help order
    return command


cli.add_command(quantize_command())

SWEEP_EXCLUDED = ("bits", "avg_bits", "size_mb", "size_ratio", "bits_json")  # each point sets its own


def run_sweep_command(model: Path, calib: Path, output: Path, budgets: str, widths: str, data: Path | None,
                      labels: Path | None, limit: int | None, quiet: bool, debug: bool, **flags: Any) -> None:
    """Quantize MODEL once per budget and uniform width, reusing one calibration and one sensitivity
    measurement, and write the models, the accuracy-against-size table (sweep.md, sweep.json; * marks the Pareto
    front) and an HTML report with CLADO's sensitivity heat map and the curve (report.html, needs matplotlib).

    Points are scored on --data when given (top-1 with labels), else on each run's held-out check.
    """
    from onnxq.report.sweep import run_sweep, sweep_table, write_sweep

    ctx = click.get_current_context()
    budget_list = parse_floats(budgets, "--budgets") or ()
    config = config_from_flags(ctx, extra={"avg_bits": budget_list[0]} if budget_list else None)
    width_list = parse_widths(widths, "--widths") if widths.strip() else ()
    echo = (lambda line: None) if quiet else (lambda line: click.echo(f"sweep: {line}", err=True))
    sweep = run_sweep(model, calib, output, config, budget_list, width_list, data, labels, limit,
                      progress_factory(not quiet), echo)
    files = write_sweep(output, sweep, model, data or calib, config.data.preprocessing)
    click.echo(sweep_table(sweep.points))
    click.echo("wrote " + ", ".join(str(path) for path in files), err=True)


def sweep_command() -> click.Command:
    """The ``sweep`` command: quantize's options (less the ones each point sets) plus the points and scoring."""
    params: list[click.Parameter] = [
        click.Argument(["model"], type=click.Path(path_type=Path)),
        click.Option(["--calib"], required=True, type=click.Path(path_type=Path),
                     help="Calibration data, as for quantize."),
        click.Option(["-o", "--output"], required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Folder for the models, the table, the caches and the report."),
        click.Option(["--budgets"], default="2.5,3,3.5,4", show_default=True,
                     help="CLADO budgets, average stored bits per weight (empty: none)."),
        click.Option(["--widths"], default="4,8", show_default=True, help="Uniform widths (empty: none)."),
        click.Option(["--data"], type=click.Path(path_type=Path), default=None,
                     help="Evaluation data for the curve (a labelled image folder gives top-1); default: each "
                          "run's held-out check."),
        click.Option(["--labels"], type=click.Path(path_type=Path), default=None, help="A labels file <file> <index>."),
        click.Option(["--limit"], type=click.IntRange(min=1), default=None, help="Evaluate at most this many samples."),
        *(config_option(spec) for spec in OPTIONS.values() if spec.flag and spec.name not in SWEEP_EXCLUDED),
    ]
    command = click.Command("sweep", callback=run_sweep_command, params=params, help=run_sweep_command.__doc__,
                            short_help="Accuracy against size over several budgets and widths.")
    for decorate in (*PREPROCESSING_OPTIONS, CALIB_AUGMENT,
                     click.option("-q", "--quiet", is_flag=True, help="No progress bars or lines, only the table."),
                     click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")):
        command = decorate(command)
    return command


cli.add_command(sweep_command())


@cli.command("eval")
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path), help="The float model to compare with.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Evaluation data, in any layout --calib accepts. Labels come from a folder per class or a "
                   "labels file (<file> <class index> per line: labels.txt in the folder, or --labels).")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="A labels file <file> <index>.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate at most this many samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a self-contained HTML report: sizes, accuracy, per-layer widths, SQNR and errors "
                   "(needs matplotlib: pip install 'onnxq[report]').")
@click.option("--report-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report's numbers as JSON.")
@click.option("--diagnostic-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples of --data that the reports' per-layer diagnostics run on.")
@preprocessing_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or information lines.")
@LOG_LEVEL_OPTION
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def eval_command(quantized, reference, data, labels, limit, batch_size, as_json, report, report_json,
                 diagnostic_samples, image_size, resize, mean, std, scale, channel_order, quiet, debug,
                 preprocess=None, resize_mode=None, log_level=None) -> None:
    """Compare QUANTIZED with its float --reference on --data: agreement, KL, SQNR, and top-1/top-5."""
    from onnxq.export.atomic import check_target
    from onnxq.export.outputs import check_outputs
    from onnxq.report.evaluate import evaluate
    from onnxq.report.html_report import require_matplotlib, write_reports
    from onnxq.report.summary import eval_summary

    for flag, path in (("--report", report), ("--report-json", report_json)):  # fail before the evaluation
        if path is not None:
            check_target(path, flag)
            for model_path in (quantized, reference):
                check_outputs(model_path, {flag: path})
    if report:
        require_matplotlib()  # fail before the evaluation, not after it
    preprocessing = image_preprocessing(image_size, resize, mean, std, scale, channel_order, preprocess, resize_mode)
    result = evaluate(quantized, reference, data, preprocessing, labels, batch_size, limit,
                      progress_factory(not quiet))
    click.echo(json.dumps(result.as_dict(), indent=1) if as_json else eval_summary(result))
    if report or report_json:
        write_reports(quantized, reference, data, report, report_json, evaluation=result.as_dict(),
                      preprocessing=preprocessing, samples=diagnostic_samples)
        for path in (report, report_json):
            if path:
                click.echo(f"wrote {path}", err=True)


def _terminate(signum: int, frame: object) -> None:
    """Turn a kill (SIGTERM) into the same clean unwinding as Ctrl-C, so temporary files are removed."""
    raise KeyboardInterrupt


ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # the machine's state, not the input or a bug


def _environment_error(err: OSError) -> str:
    """A full disk or read-only folder met anywhere (temporary files included), with where to make room."""
    where = f" writing {err.filename}" if err.filename else ""
    return (f"{err.strerror}{where}; free space or choose another folder (temporary files go to "
            f"{tempfile.gettempdir()}; set TMPDIR to move them)")


def _what_was_written() -> str:
    """After an interruption: which files were already complete (a signal during the final renames is delivered
    once they are done), or that none were."""
    from onnxq.export.atomic import committed

    written = committed()
    if not written:
        return "nothing was written"
    return "already written, complete: " + ", ".join(str(path) for path in written)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """Python warnings (numpy, Pillow, onnx) as one ``onnxq: warning:`` line, without source paths."""
    text = str(message).strip()
    logging.getLogger("onnxq").warning("%s", text.splitlines()[0][:200] if text else category.__name__)


def main() -> None:
    """Entry point: one-line errors and a non-zero exit for every failure (tracebacks with --debug)."""
    import numpy as np

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelFormatter())
    logging.basicConfig(handlers=[handler], level=log_level(sys.argv[1:]))
    signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _show_warning
    from onnxq.allocator import keep_freed_memory

    keep_freed_memory()
    debug = "--debug" in sys.argv
    try:
        with np.errstate(all="ignore"):  # results are checked for NaN/Inf where it matters, with our own message
            cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        click.echo(f"onnxq: interrupted; {_what_was_written()}", err=True)
        sys.exit(130)
    except OnnxqError as err:
        if debug:
            raise
        click.echo(f"onnxq: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"onnxq: interrupted; {_what_was_written()}", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - a last line of defence: never a bare traceback
        if debug:
            raise
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRORS:
            click.echo(f"onnxq: error: {_environment_error(err)}", err=True)
            sys.exit(1)
        first = str(err).splitlines()[0][:200] if str(err) else ""
        click.echo(f"onnxq: internal error: {type(err).__name__}: {first} (rerun with --debug and report it)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
