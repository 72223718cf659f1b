"""One peer quantizer job (onnxruntime, NNCF, AMD Quark), run as its own process by bench/speed.py and
bench/peers.py so its CPU time and memory are measured alone (needs ``pip install -e '.[peers]'``).

    python bench/peer_jobs.py static MODEL SAMPLES OUT [--batch-size 16]
        quant_pre_process, then quantize_static: W8A8 QDQ, per channel, MinMax, QUInt8 activations and QInt8
        weights, calibrated on the arrays SAMPLES/order.txt lists (one sample each, read in that order).
    python bench/peer_jobs.py matmul4 MODEL OUT --algo rtn|hqq [--block-size 32]
        the MatMul 4-bit quantizer (MatMulNBits, asymmetric, one scale per block of inputs); needs no data.
    python bench/peer_jobs.py static-int4 MODEL SAMPLES OUT
        quantize_static with QInt4 weights per channel (the first and last layer QInt8 through
        TensorQuantOverrides) and QUInt16 activations: onnxruntime has no weight-only int4 Conv path.
    python bench/peer_jobs.py nncf-w8a8 MODEL SAMPLES OUT       nncf.quantize (INT8, its default preset)
    python bench/peer_jobs.py nncf-int4 MODEL OUT               nncf.compress_weights INT4_ASYM, ratio 1
    python bench/peer_jobs.py quark-w8a8 MODEL SAMPLES OUT      Quark ModelQuantizer: W8A8 QDQ per channel MinMax
    python bench/peer_jobs.py quark-int4 MODEL SAMPLES OUT      the same with QuantType.QInt4 weights
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np
import onnx

ORDER_FILE = "order.txt"  # the sample files in the order both tools read them (bench/speed.py writes it)


def sample_files(folder: Path) -> list[Path]:
    """The sample files of a folder written by bench/speed.py, in reading order."""
    return [folder / name for name in (folder / ORDER_FILE).read_text().split()]


def input_name(model: Path) -> str:
    """The single fed input of a model (initializers listed as inputs excluded)."""
    graph = onnx.load(str(model), load_external_data=False).graph
    fed = [v.name for v in graph.input if v.name not in {t.name for t in graph.initializer}]
    if len(fed) != 1:
        raise click.UsageError(f"{model} has {len(fed)} inputs; the static peer feeds single-input models")
    return fed[0]


class ArrayReader:
    """An onnxruntime CalibrationDataReader over .npy samples, ``batch_size`` at a time."""

    def __init__(self, files: list[Path], name: str, batch_size: int) -> None:
        self.files, self.name, self.batch_size = files, name, batch_size
        self.batches = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.files), self.batch_size):
            yield {self.name: np.concatenate([np.load(f) for f in self.files[start:start + self.batch_size]])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:
        self.batches = self._batches()


def calibrated_job(command: Callable) -> Callable:
    """The arguments of a job that calibrates: MODEL SAMPLES OUT [--batch-size N]."""
    for decorate in reversed([click.argument("model", type=click.Path(exists=True, path_type=Path)),
                              click.argument("samples", type=click.Path(exists=True, file_okay=False, path_type=Path)),
                              click.argument("out", type=click.Path(path_type=Path)),
                              click.option("--batch-size", type=int, default=16, show_default=True)]):
        command = decorate(command)
    return command


@click.group()
def main() -> None:
    """Run one onnxruntime quantizer job."""


@main.command()
@calibrated_job
def static(model: Path, samples: Path, out: Path, batch_size: int) -> None:
    """onnxruntime's pre-processing and W8A8 quantize_static (per channel, MinMax)."""
    static_job(model, samples, out, batch_size, "QInt8", "QUInt8")


def static_job(model: Path, samples: Path, out: Path, batch_size: int, weight_type: str, activation_type: str,
               first_last_type: str | None = None) -> None:
    """quant_pre_process, then quantize_static per channel with MinMax ranges; with ``first_last_type`` the first
    and last weighted layers' weights get that type through TensorQuantOverrides."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared))
        extra = {}
        if first_last_type is not None:
            ends = weighted_ends(onnx.load(str(prepared)))
            extra["TensorQuantOverrides"] = {w: [{"quant_type": getattr(QuantType, first_last_type)}] for w in ends}
        reader = ArrayReader(sample_files(samples), input_name(prepared), batch_size)
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=getattr(QuantType, activation_type),
                        weight_type=getattr(QuantType, weight_type), calibrate_method=CalibrationMethod.MinMax,
                        extra_options=extra)


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--algo", type=click.Choice(["rtn", "hqq"]), required=True)
@click.option("--block-size", type=int, default=32, show_default=True)
def matmul4(model: Path, out: Path, algo: str, block_size: int) -> None:
    """onnxruntime's MatMul 4-bit quantizer (MatMulNBitsQuantizer) with its RTN or HQQ algorithm."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    config = (RTNWeightOnlyQuantConfig() if algo == "rtn"
              else HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block_size, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), False)


def weighted_ends(model: onnx.ModelProto) -> tuple[str, str]:
    """The weights of the first and the last Conv/Gemm/MatMul with a constant weight, in graph order."""
    constants = {t.name for t in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in constants]
    return weights[0], weights[-1]


def feed_list(samples: Path, model: Path) -> list[dict[str, np.ndarray]]:
    """Every sample as its own feed dict (what NNCF's Dataset iterates)."""
    name = input_name(model)
    return [{name: np.load(f)} for f in sample_files(samples)]


@main.command("static-int4")
@calibrated_job
def static_int4(model: Path, samples: Path, out: Path, batch_size: int) -> None:
    """onnxruntime's int4 weights: quantize_static QInt4 per channel, first/last QInt8, QUInt16 activations."""
    static_job(model, samples, out, batch_size, "QInt4", "QUInt16", first_last_type="QInt8")


@main.command("nncf-w8a8")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("samples", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def nncf_w8a8(model: Path, samples: Path, out: Path) -> None:
    """NNCF post-training quantization of an ONNX model (INT8 weights and activations, its defaults)."""
    import nncf

    feeds = feed_list(samples, model)
    quantized = nncf.quantize(onnx.load(str(model)), nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(quantized, str(out))


@main.command("nncf-int4")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def nncf_int4(model: Path, out: Path) -> None:
    """NNCF weight compression to INT4 (asymmetric, every layer it allows; Conv stays at its INT8 backup)."""
    import nncf

    compressed = nncf.compress_weights(onnx.load(str(model)), mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=1.0,
                                       group_size=-1)
    onnx.save(compressed, str(out))


def quark_job(model: Path, samples: Path, out: Path, weight_type: str, batch_size: int) -> None:
    """Quark's ModelQuantizer, W8A8-style QDQ per channel with MinMax calibration, weights of ``weight_type``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from quark.onnx import Config, ModelQuantizer, QuantizationConfig

    config = QuantizationConfig(calibrate_method=CalibrationMethod.MinMax, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                                per_channel=True)
    reader = ArrayReader(sample_files(samples), input_name(model), batch_size)
    with tempfile.TemporaryDirectory(prefix="quark-") as scratch:  # Quark writes quantized_info.csv into the cwd
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            ModelQuantizer(Config(global_quant_config=config)).quantize_model(str(model), str(out.resolve()), reader)
        finally:
            os.chdir(cwd)


@main.command("quark-w8a8")
@calibrated_job
def quark_w8a8(model: Path, samples: Path, out: Path, batch_size: int) -> None:
    """AMD Quark ONNX: W8A8 QDQ, per channel, MinMax."""
    quark_job(model, samples, out, "QInt8", batch_size)


@main.command("quark-int4")
@calibrated_job
def quark_int4(model: Path, samples: Path, out: Path, batch_size: int) -> None:
    """AMD Quark ONNX asked for QInt4 weights (its legacy type; bench/peers.py reports what it stores)."""
    quark_job(model, samples, out, "QInt4", batch_size)


if __name__ == "__main__":
    main()
