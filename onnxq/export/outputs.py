"""Check, before any work, every file a run will write: never a file the input model reads (the model or its
external data), never two outputs on one path, and only regular files or new paths (``atomic.check_target``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxq.errors import OnnxqError
from onnxq.export.atomic import check_target

DATA_FLAG = "-o's data file"


def data_file(output: Path) -> Path:
    """The external-data file the export writes next to ``output``."""
    return output.parent / f"{output.name}.data"


def model_files(path: Path) -> list[Path]:
    """The model file and the external-data files it references (those that exist), each once."""
    files = [path]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the loader, with its own message
        return files
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            data = path.parent / location if location else None
            if data is not None and data.is_file() and not any(_same_file(data, f) for f in files):
                files.append(data)
    return files


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of the graph and of its subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def check_outputs(model_path: Path, outputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, outputs that would overwrite a file the input model reads, that share a path, or
    that are not regular files or new paths. ``outputs`` maps each option (``-o``, ``--stats``...) to its path;
    ``-o`` also writes ``<output>.data``."""
    written = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    output = written.get("-o")
    if output is not None:
        written[DATA_FLAG] = data_file(output)
        check_target(output)
    for flag, path in written.items():
        if flag != "-o":
            _check_kind(path, flag)
    _check_distinct(written)
    existing = {flag: path for flag, path in written.items() if os.path.lexists(path)}
    if not existing:
        return  # nothing would be replaced, so no input file can be
    inputs = model_files(model_path) if model_path.is_file() else []
    for flag, path in existing.items():
        for read in inputs:
            if _same_file(path, read):
                raise OnnxqError(_overlap(flag, path, read, model_path))


def _overlap(flag: str, path: Path, read: Path, model_path: Path) -> str:
    if flag == DATA_FLAG:
        return f"-o would write its weights to {path}, a file {model_path.name} reads; choose another output name"
    if _same_file(read, model_path):
        return f"{flag} {path} is the input model; choose another path"
    return f"{flag} {path} is {read.name}, which {model_path.name} reads its weights from; choose another path"


def _check_kind(path: Path, flag: str) -> None:
    """A cache or data file may be new or a regular file, never a folder or a special file."""
    try:
        check_target(path, flag)
    except OnnxqError as err:
        if "folder" in str(err) and "does not exist" in str(err) and flag.startswith("--"):
            return  # caches create their folder
        raise


def _check_distinct(written: dict[str, Path]) -> None:
    seen: dict[str, str] = {}
    for flag, path in written.items():
        real = os.path.realpath(path)
        if real in seen:
            raise OnnxqError(f"{seen[real]} and {flag} are the same file {path}; give each its own path")
        seen[real] = flag


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
