"""One onnxruntime quantizer job, run as its own process by bench/speed.py so its CPU time and memory are measured
alone (needs ``pip install -e '.[peers]'``).

    python bench/peers.py static MODEL SAMPLES OUT [--batch-size 16]
        quant_pre_process, then quantize_static: W8A8 QDQ, per channel, MinMax, QUInt8 activations and QInt8
        weights, calibrated on the arrays SAMPLES/order.txt lists (one sample each, read in that order).
    python bench/peers.py matmul4 MODEL OUT --algo rtn|hqq [--block-size 32]
        the MatMul 4-bit quantizer (MatMulNBits, asymmetric, one scale per block of inputs); needs no data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
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


@click.group()
def main() -> None:
    """Run one onnxruntime quantizer job."""


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("samples", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=16, show_default=True)
def static(model: Path, samples: Path, out: Path, batch_size: int) -> None:
    """onnxruntime's pre-processing and W8A8 quantize_static (per channel, MinMax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared))
        reader = ArrayReader(sample_files(samples), input_name(prepared), batch_size)
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


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


if __name__ == "__main__":
    main()
