"""The ``onnxq`` command line: ``onnxq MODEL --calib DATA -o OUT`` (the ``quantize`` subcommand is implied)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import OnnxqError
from .evaluate import evaluate
from .images import ImagePreprocessing
from .layers import QUANTIZABLE_OPS
from .mixed import Budget
from .passes import DEFAULT_METHOD, ROUNDING_PASSES, SUPPORTED_BITS
from .pipeline import Options, quantize_model
from .progress import progress_factory
from .report import eval_summary, kernel_table, layer_table, summary


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


def parse_bit_choices(text: str) -> tuple[int, ...]:
    """``2,3,4,8`` -> (2, 3, 4, 8), each a supported width."""
    try:
        widths = tuple(sorted({int(v) for v in text.replace(",", " ").split()}))
    except ValueError as err:
        raise click.BadParameter("--bit-choices takes widths such as 2,3,4,8") from err
    if not widths or any(b not in SUPPORTED_BITS for b in widths):
        raise click.BadParameter(f"--bit-choices must be among {', '.join(map(str, SUPPORTED_BITS))}")
    return widths


def budget_from_flags(avg_bits: float | None, size_mb: float | None, size_ratio: float | None) -> Budget:
    """At most one budget flag, and a positive one."""
    given = {k: v for k, v in (("--avg-bits", avg_bits), ("--size-mb", size_mb), ("--size-ratio", size_ratio))
             if v is not None}
    if len(given) > 1:
        raise click.UsageError(f"give one budget, not {' and '.join(given)}")
    for flag, value in given.items():
        if value != value:  # NaN is the only value unequal to itself
            raise click.BadParameter(f"{flag} nan is not a number; give a positive number such as 3.5")
        if abs(value) == float("inf"):
            raise click.BadParameter(f"{flag} {value} is not a finite number; give a positive number such as 3.5")
        if value <= 0:
            raise click.BadParameter(f"{flag} must be positive, not {value}")
    return Budget(avg_bits, size_mb, size_ratio)


def image_preprocessing(image_size, resize, mean, std, scale, channel_order) -> ImagePreprocessing | None:
    """Build the preprocessing from the flags, leaving unset fields at their defaults."""
    fields = {}
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


PREPROCESSING_OPTIONS = [
    click.option("--image-size", default=None, help="Crop size HxW for image folders (default: the model input)."),
    click.option("--resize", default=None,
                 help="Resize before the centre crop: 256 (short side) or 256x256 (default: crop size / 0.875)."),
    click.option("--mean", default=None,
                 help="Per-channel mean subtracted after scaling [default: 0.485,0.456,0.406]."),
    click.option("--std", default=None, help="Per-channel std divided by [default: 0.229,0.224,0.225]."),
    click.option("--scale", type=float, default=None, help="Pixel multiplier applied first [default: 1/255]."),
    click.option("--channel-order", type=click.Choice(["RGB", "BGR"], case_sensitive=False), default=None,
                 help="Channel order the model expects [default: RGB]."),
]


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


@cli.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", "calib", required=True, type=click.Path(path_type=Path),
              help="Calibration data: a folder of images, *.npy files, <input_name>/*.npy folders, .npz files "
                   "keyed by input name, or onnxruntime's test_data_set_*/input_*.pb layout.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write the quantized model (never the input file).")
@click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default="4", show_default=True,
              help="Weight width for every layer. 3-bit codes are stored in INT4 with the range [-4, 3].")
@click.option("--method", type=click.Choice(sorted(ROUNDING_PASSES)), default=DEFAULT_METHOD,
              show_default=True,
              help="Rounding pass: comq (coordinate descent, best), gptq, or rtn (round to nearest).")
@click.option("--symmetric/--asymmetric", default=False, show_default=True,
              help="Symmetric grids (zero point 0, as onnxruntime's default) or asymmetric (more accurate).")
@click.option("--clip/--no-clip", default=True, show_default=True,
              help="Search a per-channel clipping range that minimises the weight MSE before rounding.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Round against the centred input statistics and fold each layer's mean output error into "
                   "its bias (Conv/Gemm, or the Add after a MatMul).")
@click.option("--shrinkage/--no-shrinkage", default=True, show_default=True,
              help="Shrink input statistics estimated from few rows (e.g. a classifier after global pooling: one "
                   "row per image) towards their diagonal (OAS), so rounding does not overfit the calibration set.")
@click.option("--sequential/--no-sequential", default=False, show_default=True,
              help="Round layer after layer on the inputs the already-quantized layers feed it, towards the float "
                   "model's outputs, so each layer compensates the error before it (one capture pass per stage, "
                   "slower; --stats is not used). With a budget, CLADO allocates on float-input statistics, and the "
                   "allocations it verifies, and the one it keeps, are rounded sequentially.")
@click.option("--block-size", "--block_size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Block-wise scales: one scale and zero point per block of this many inputs of each MatMul/Gemm "
                   "weight (Conv layers stay per channel). More accurate at 3-4 bits, for about 1 extra bit per "
                   "weight at block 32. Default: one per output channel.")
@click.option("--matmul-nbits", is_flag=True,
              help="Write MatMul layers with 4-bit (or 3-bit) codes as onnxruntime's com.microsoft.MatMulNBits "
                   "(packed 4-bit blocks, computed in float; onnxruntime only); other layers keep DequantizeLinear. "
                   "Faster than float where one row at a time meets a large weight (token-by-token decoding: 2x "
                   "on a 4096x4096 MatMul); slower at 20 rows, and only 4% faster on all-MiniLM-L6-v2 at batch 1. "
                   "onnxruntime also fuses the default 4-bit DequantizeLinear export into this kernel, computing "
                   "with int8 activations (4x on that MatMul; 1.2x on MiniLM).")
@click.option("--accuracy-level", "--accuracy_level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="With --matmul-nbits: the MatMulNBits accuracy_level. 0 computes in float, as the file says; 4 "
                   "lets onnxruntime quantize activations to int8 (all-MiniLM-L6-v2 batch 1: 1.18x vs 1.04x).")
@click.option("--first-last-bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Width of the first and last quantized layers (they are the most sensitive), e.g. 8.")
@click.option("--nodes_to_exclude", "--nodes-to-exclude", multiple=True,
              help="Node names or regular expressions to keep in float (repeat or separate with commas).")
@click.option("--op_types_to_quantize", "--op-types-to-quantize", multiple=True,
              help=f"Op types to quantize (default: {', '.join(QUANTIZABLE_OPS)}).")
@click.option("--calib-size", type=click.IntRange(min=0), default=256, show_default=True,
              help="Use at most this many calibration samples (0: all); from a folder they are spread over the "
                   "sorted file names (256 of 1000: every 4th), so a class-sorted folder is not cut to its first "
                   "classes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples per onnxruntime batch; memory is bounded by one batch.")
@click.option("--stats", type=click.Path(path_type=Path), default=None,
              help="Cache file for calibration statistics: reused when it matches the model's weights, "
                   "written otherwise. Lets a second run with other bits skip calibration.")
@click.option("--bit-choices", default="2,3,4,8", show_default=True,
              help="Mixed precision: the widths CLADO may give each layer (used with a budget).")
@click.option("--avg-bits", type=float, default=None,
              help="Mixed precision budget: average stored bits per weight (3-bit counts as 4, as stored).")
@click.option("--size-mb", type=float, default=None, help="Mixed precision budget: output file size in MB.")
@click.option("--size-ratio", type=float, default=None,
              help="Mixed precision budget: output size as a fraction of the float file, e.g. 0.12.")
@click.option("--sensitivity", type=click.Choice(["fast", "exact", "diagonal"]), default="fast", show_default=True,
              help="Layer-interaction estimate: fast (single-layer runs + Fisher cross terms), exact (every "
                   "pair measured, slow), or diagonal (layers independent, as other tools do).")
@click.option("--clado-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Samples the sensitivity losses are measured on: those after the --calib-size "
                   "calibrated on when the data has them (held out), else the first ones.")
@click.option("--verify-samples", type=click.IntRange(min=0), default=512, show_default=True,
              help="Held-out samples on which the solver's allocation, the diagonal-only one and the widest uniform "
                   "width that fits are measured (one forward pass each); the lowest loss is kept. 0: no check.")
@click.option("--clado-time-limit", type=float, default=60.0, show_default=True,
              help="Seconds for the exact integer program; the optimality gap is reported if it stops early.")
@click.option("--sensitivity-cache", type=click.Path(path_type=Path), default=None,
              help="Cache file for the sensitivity matrix, so another budget skips the measurement.")
@click.option("--bits-json", type=click.Path(path_type=Path), default=None,
              help="With a budget: write the chosen widths here (also in TensorQuantOverrides form). "
                   "Without: read per-layer widths from this file and apply them.")
@click.option("--act-bits", type=click.Choice(["8"]), default=None,
              help="Also quantize activations to uint8 (opt-in). 8-bit layers become W8A8 with symmetric weights and "
                   "run as QLinearConv/QGemm integer kernels; lower-bit layers become WnA8 (small, not faster).")
@click.option("--prefer", type=click.Choice(["size", "speed"]), default="size", show_default=True,
              help="speed: 8-bit layers become W8A8 (integer kernels) and the others stay weight-only in float; with "
                   "a budget, CLADO also favours 8 bits for the layers doing most of the multiply-adds. Implies "
                   "--act-bits 8. size: every layer's activations follow --act-bits, CLADO minimises the loss only.")
@click.option("--calibration_method", "--act-method", "act_method", type=click.Choice(["mse", "percentile", "minmax"]),
              default="mse", show_default=True, help="How activation ranges are chosen (with --act-bits).")
@click.option("--kernel-report", is_flag=True,
              help="After writing, list the onnxruntime kernel each layer runs as and time float vs quantized "
                   "(median latency at batch 1 and 32).")
@preprocessing_options
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in <output>.data (default: when the input model keeps its weights in external "
                   "data, or the output exceeds 2 GB).")
@click.option("--allow-empty", is_flag=True, help="Write the model unchanged if it has nothing to quantize.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables, only errors.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def quantize_command(model, calib, output, bits, method, symmetric, clip, bias_correction, shrinkage, sequential,
                     block_size,
                     matmul_nbits, accuracy_level,
                     first_last_bits, nodes_to_exclude,
                     op_types_to_quantize, calib_size, batch_size, stats, bit_choices, avg_bits, size_mb, size_ratio,
                     sensitivity, clado_samples, verify_samples, clado_time_limit, sensitivity_cache, bits_json,
                     act_bits, prefer, act_method, kernel_report, image_size, resize,
                     mean, std, scale, channel_order, external_data, allow_empty, quiet, debug) -> None:
    """Quantize MODEL's Conv/Gemm/MatMul weights to 2, 3, 4 or 8 bits and write a QDQ ONNX model."""
    options = Options(
        bits=int(bits), method=method, symmetric=symmetric, clip=clip, bias_correction=bias_correction,
        shrinkage=shrinkage, sequential=sequential,
        block_size=int(block_size) if block_size else None, matmul_nbits=matmul_nbits,
        accuracy_level=accuracy_level,
        first_last_bits=int(first_last_bits) if first_last_bits else None,
        nodes_to_exclude=split_list(nodes_to_exclude),
        op_types_to_quantize=split_list(op_types_to_quantize) or QUANTIZABLE_OPS,
        calib_size=calib_size or None, batch_size=batch_size, stats=stats,
        preprocessing=image_preprocessing(image_size, resize, mean, std, scale, channel_order),
        allow_empty=allow_empty, external_data=external_data,
        budget=budget_from_flags(avg_bits, size_mb, size_ratio), bit_choices=parse_bit_choices(bit_choices),
        sensitivity=sensitivity, clado_samples=clado_samples, clado_time_limit=clado_time_limit,
        verify_samples=verify_samples,
        sensitivity_cache=sensitivity_cache, bits_json=bits_json,
        act_bits=int(act_bits) if act_bits else None, act_method=act_method, prefer=prefer)
    result = quantize_model(model, calib, output, options,
                            progress=progress_factory(not quiet))
    if not quiet:
        click.echo(layer_table(result))
        click.echo(summary(result))
    if kernel_report:
        click.echo(kernel_table(model, result.output))


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
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def eval_command(quantized, reference, data, labels, limit, batch_size, as_json, report, report_json,
                 diagnostic_samples, image_size, resize, mean, std, scale, channel_order, quiet, debug) -> None:
    """Compare QUANTIZED with its float --reference on --data: agreement, KL, SQNR, and top-1/top-5."""
    from .diagnostics import diagnostics_on_data
    from .html_report import report_context, require_matplotlib, write_report, write_report_json

    if report:
        require_matplotlib()  # fail before the evaluation, not after it
    preprocessing = image_preprocessing(image_size, resize, mean, std, scale, channel_order)
    result = evaluate(quantized, reference, data, preprocessing, labels, batch_size, limit,
                      progress_factory(not quiet))
    click.echo(json.dumps(result.as_dict(), indent=1) if as_json else eval_summary(result))
    if report or report_json:
        layers = diagnostics_on_data(quantized, reference, data, preprocessing, diagnostic_samples)
        context = report_context(quantized, reference, layers, result.as_dict())
        for path, write in ((report, write_report), (report_json, write_report_json)):
            if path:
                write(path, context)
                click.echo(f"wrote {path}", err=True)


def _terminate(signum: int, frame: object) -> None:
    """Turn a kill (SIGTERM) into the same clean unwinding as Ctrl-C, so temporary files are removed."""
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: one-line errors and a non-zero exit for every failure (tracebacks with --debug)."""
    logging.basicConfig(format="onnxq: warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        click.echo("onnxq: interrupted; nothing was written", err=True)
        sys.exit(130)
    except OnnxqError as err:
        if debug:
            raise
        click.echo(f"onnxq: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("onnxq: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - a last line of defence: never a bare traceback
        if debug:
            raise
        first = str(err).splitlines()[0][:200] if str(err) else ""
        click.echo(f"onnxq: internal error: {type(err).__name__}: {first} (rerun with --debug and report it)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
