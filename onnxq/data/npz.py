"""Read arrays from an ``.npz`` cache without trusting it: each member's header (dtype, shape) is checked
against what the caller expects before any data is read, so a crafted header cannot allocate or mislead."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError, first_line

NPZ_MAGIC = b"PK\x03\x04"
HEADER_MEMBER = "header.npy"
MAX_HEADER_BYTES = 1 << 24


class BadCache(Exception):
    """The cache file is unreadable or holds something other than what was expected; the message says what."""


def looks_like_cache(path: Path, first_member: str = HEADER_MEMBER) -> bool:
    """True when the file starts like an onnxq cache (a zip whose first member is ``first_member``): only such
    files are overwritten when they turn out unreadable, never a file of the user's given by mistake."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(30 + len(first_member))
    except OSError:
        return False
    return start.startswith(NPZ_MAGIC) and start[30:] == first_member.encode()


class CacheReader:
    """An open ``.npz`` file whose members are read only when their header matches the expected shape."""

    def __init__(self, path: Path) -> None:
        try:
            self.archive = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
            raise BadCache(f"not an .npz file ({first_line(err)})") from err
        self.names = set(self.archive.namelist())

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.archive.close()

    def array(self, name: str, shape: tuple[int, ...] | None, kinds: str = "f", max_elements: int | None = None
              ) -> np.ndarray:
        """Member ``name`` (without ``.npy``), which must have ``shape`` (any shape up to ``max_elements`` values
        when None) and a dtype of one of the numpy ``kinds``; raises BadCache naming what is wrong."""
        member = f"{name}.npy"
        if member not in self.names:
            raise BadCache(f"{name} is missing")
        try:
            with self.archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                found_shape, _, dtype = read_header(handle)
            if dtype.hasobject or dtype.kind not in kinds:
                raise BadCache(f"{name} has dtype {dtype}, expected a {_kind_names(kinds)} array")
            if shape is not None and tuple(found_shape) != tuple(shape):
                raise BadCache(f"{name} has shape {list(found_shape)}, expected {list(shape)}")
            if shape is None and (max_elements is None or int(np.prod(found_shape)) > max_elements):
                raise BadCache(f"{name} has {int(np.prod(found_shape))} values, more than a cache holds")
            with self.archive.open(member) as handle:
                array = np.lib.format.read_array(handle, allow_pickle=False)
        except BadCache:
            raise
        except Exception as err:  # noqa: BLE001 - zipfile, numpy and zlib raise many types for damaged members
            raise BadCache(f"{name} is unreadable ({first_line(err)})") from err
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadCache(f"{name} contains NaN or Inf")
        return array

    def header(self) -> bytes:
        """The raw bytes of the ``header`` member (a uint8 array holding JSON)."""
        return self.array("header", None, "u", MAX_HEADER_BYTES).tobytes()


def _kind_names(kinds: str) -> str:
    names = {"f": "float", "u": "unsigned integer", "i": "integer", "U": "string"}
    return " or ".join(names.get(k, k) for k in kinds)


def load_npy(path: Path) -> np.ndarray:
    """A calibration array from an ``.npy`` file, or a one-line OnnxqError naming the file and the fix. The file is
    memory-mapped first, so a header claiming more data than the file holds fails before anything is allocated."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        array = np.array(mapped) if isinstance(mapped, np.ndarray) else mapped
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError, TypeError... for bad files
        raise OnnxqError(f"calibration file {path} is not a readable .npy array ({first_line(err)}); save the sample "
                         "with numpy.save") from err
    if not isinstance(array, np.ndarray):
        array.close()
        raise OnnxqError(f"calibration file {path} is an .npz archive, not an .npy array; rename it to .npz")
    return _numeric(array, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a calibration ``.npz`` file by name, or a one-line OnnxqError naming the file and the fix."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # noqa: BLE001 - zipfile and numpy raise many types for damaged archives
        raise OnnxqError(f"calibration file {path} is not a readable .npz archive ({first_line(err)}); save the "
                         "sample with numpy.savez") from err
    return {key: _numeric(array, path) for key, array in arrays.items()}


def _numeric(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "fiub":
        raise OnnxqError(f"calibration file {path} holds {array.dtype} values, not numbers; save numeric arrays")
    return array
