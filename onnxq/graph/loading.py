"""Load an ONNX model from disk with clear errors, and fingerprint its weights."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from onnxq.errors import OnnxqError

TWO_GB = 2**31
PROTOBUF_LIMIT = TWO_GB - 2**26  # above this, a model goes to files with external data (room for metadata)


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read a model (external data included) and check it, or fail with a one-line explanation."""
    return load_model_and_layout(path)[0]


def load_model_and_layout(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, and whether the file kept its weights in external data (outputs follow that layout)."""
    path = Path(path)
    if not path.exists():
        raise OnnxqError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise OnnxqError(f"{path} is a folder; pass the path of an .onnx file")
    if not path.is_file():  # a device (/dev/zero), FIFO or socket would be read forever
        raise OnnxqError(f"{path} is not a regular file; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, MemoryError) as err:
        raise OnnxqError(f"{path} is not a readable ONNX model ({_first_line(err)}); "
                         "re-export it or check that the file is complete") from err
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:
        _load_external_data(model, path)
    if not model.graph.node:
        raise OnnxqError(f"{path} is not a valid ONNX model (its graph has no nodes); re-export it")
    try:
        onnx.checker.check_model(model if proto_size(model) < TWO_GB else str(path))
    except (onnx.checker.ValidationError, ValueError) as err:
        raise OnnxqError(f"{path} fails the ONNX checker ({_first_line(err)}); fix or re-export the model") from err
    return model, external


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the weights kept beside the model; onnx refuses locations outside the model's folder."""
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (onnx.checker.ValidationError, DecodeError, RuntimeError, ValueError, OSError, MemoryError) as err:
        raise OnnxqError(f"cannot read the external weights of {path} ({_first_line(err)}); keep the .data file "
                         "complete and inside the model's folder, named as the model references it") from err


def proto_size(model: onnx.ModelProto) -> int:
    """The model's serialized size in bytes. protobuf cannot even measure a message over 2 GB; then the weights'
    bytes are returned, which is what decides every "too big for one protobuf" choice anyway."""
    try:
        return model.ByteSize()
    except EncodeError:
        return TWO_GB + sum(len(t.raw_data) for t in model.graph.initializer)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
