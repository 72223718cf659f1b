"""Calibration data: detect the layout of ``--calib`` and stream validated, batched feed dicts.

Layouts (as peers use them): an image folder; ``*.npy`` (one sample or batch each) for a single input;
``<input_name>/*.npy`` for several inputs, matched by file name; ``.npz`` files keyed by input name;
onnxruntime's ``test_data_set_*/input_*.pb``. In Python: any ``CalibrationDataReader`` (an object with
``get_next()``) or an iterable of feed dicts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxq.data.images import ImagePreprocessing, list_images, read_image
from onnxq.data.masking import LENGTH_WINDOW, attention_mask_name, by_length, can_pad, pad_tokens, token_inputs
from onnxq.data.npz import load_npy, load_npz
from onnxq.data.presets import DEFAULT_SIZE, SIZE_METADATA_KEY, from_metadata
from onnxq.errors import OnnxqError, first_line

log = logging.getLogger("onnxq")
AUGMENT_SEED = 0  # --calib-augment: the same random views on every run (the statistics cache relies on it)
AUGMENT_RECIPE = "2x2 mosaics of random crops (10-100 %) and flips, colour jitter 0.4"  # in the statistics key
CHECK_SEED = 1  # the held-out views' own seed: they stay the same whatever the number of calibration views
CHECK_VIEWS = 64  # --calib-augment: views held out after the calibration ones, for the check of the written model
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name, numpy dtype and shape (None for a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def image_size(self) -> tuple[int, int] | None:
        """(height, width) if this input looks like an NCHW or NHWC image with static spatial dims."""
        if len(self.shape) != 4:
            return None
        spatial = self.shape[1:3] if self.is_nhwc() else self.shape[2:4]
        return (spatial[0], spatial[1]) if None not in spatial else None

    def is_nhwc(self) -> bool:
        return len(self.shape) == 4 and self.shape[3] in (1, 3) and self.shape[1] not in (1, 3)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are fed at run time (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def declared_preprocessing(model: onnx.ModelProto) -> dict:
    """The preprocessing a model declares in its metadata (``onnxq.data.presets``), empty when none."""
    return from_metadata({p.key: p.value for p in model.metadata_props})


def default_preprocessing(inputs: list[InputSpec], given: ImagePreprocessing | None,
                          declared: dict | None = None) -> ImagePreprocessing:
    """Every preprocessing field set: the given ones, the given preset, what the model ``declared``, torchvision;
    the crop size and layout from the model's image input when the user did not set them."""
    base = given or ImagePreprocessing()
    if len(inputs) != 1:
        return base.completed(declared)
    return base.completed(declared, inputs[0].image_size(), "NHWC" if inputs[0].is_nhwc() else "NCHW")


def has_dynamic_image_size(spec: InputSpec) -> bool:
    """A 4-D image input whose height or width is not fixed."""
    return len(spec.shape) == 4 and spec.image_size() is None


def layout_of(path: Path, names: list[str]) -> str:
    """Which calibration layout a folder holds: pb, per_input, npz, npy or images (checked in that order)."""
    if any(path.glob("test_data_set_*")):
        return "pb"
    per_input = [path / name.replace("/", "_") for name in names]
    if all(folder.is_dir() for folder in per_input) and any(per_input[0].glob("*.npy")):
        return "per_input"
    if any(path.glob("*.npz")):
        return "npz"
    if any(path.glob("*.npy")):
        return "npy"
    return "images"


def reads_images(calib: object, inputs: list[InputSpec]) -> bool:
    """Whether ``calib`` is a folder of images (so the preprocessing applies to it)."""
    return isinstance(calib, str | Path) and Path(calib).is_dir() and \
        layout_of(Path(calib), [spec.name for spec in inputs]) == "images"


def feeds_from(calib: object, inputs: list[InputSpec], preprocessing: ImagePreprocessing | None = None
               ) -> tuple[Iterator[Feed], int | None]:
    """Raw feeds from a path, a reader or an iterable, and the number of files when known."""
    if isinstance(calib, str | Path):
        return _feeds_from_path(Path(calib), inputs, preprocessing)
    if hasattr(calib, "get_next"):
        return _from_reader(calib), None
    if isinstance(calib, dict):
        return iter([calib]), 1
    if isinstance(calib, Iterable):
        return iter(calib), (len(calib) if hasattr(calib, "__len__") else None)
    raise OnnxqError(f"calibration data of type {type(calib).__name__} is not supported; pass a folder, "
                     "a CalibrationDataReader or an iterable of {input_name: array} dicts")


def _from_reader(reader: object) -> Iterator[Feed]:
    """Drain an onnxruntime-style reader (``get_next()`` returns None at the end), rewinding first."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    while (feed := reader.get_next()) is not None:
        yield feed


def spread_order(count: int) -> list[int]:
    """Indices ``0..count-1`` in bit-reversed (van der Corput) order: every prefix is spread evenly over the
    whole range, so ``--calib-size 256`` of 1000 class-sorted files takes every 4th file, not the first
    256 classes, and the held-out samples after it are spread too."""
    bits = max(1, (count - 1).bit_length())
    reversed_index = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(count)]
    return sorted(range(count), key=reversed_index.__getitem__)


def _spread(files: list) -> list:
    """The sorted file list in spread order (folders are often sorted by class or by source)."""
    return [files[i] for i in spread_order(len(files))]


def _feeds_from_path(path: Path, inputs: list[InputSpec], preprocessing: ImagePreprocessing | None
                     ) -> tuple[Iterator[Feed], int | None]:
    """Detect the on-disk layout and stream its feeds, files in spread order (``spread_order``)."""
    if not path.exists():
        raise OnnxqError(f"calibration path {path} does not exist; pass a folder of images or arrays")
    names = [spec.name for spec in inputs]
    if path.is_file():
        if path.suffix == ".npz":
            return _npz_feeds([path], names), 1
        if path.suffix == ".npy" and len(names) == 1:
            return iter([{names[0]: load_npy(path)}]), 1
        raise OnnxqError(f"calibration file {path} is not .npz or .npy; pass a folder or an .npz keyed by input name")
    layout = layout_of(path, names)
    if layout == "pb":
        pb_sets = _spread(sorted(path.glob("test_data_set_*")))
        return _pb_feeds(pb_sets, names), len(pb_sets)
    if layout == "per_input":
        per_input = [path / name.replace("/", "_") for name in names]
        return _per_input_npy_feeds(per_input, names), len(list(per_input[0].glob("*.npy")))
    if layout == "npz":
        npz = _spread(sorted(path.glob("*.npz")))
        return _npz_feeds(npz, names), len(npz)
    if layout == "npy":
        if len(names) != 1:
            raise OnnxqError(f"{path} holds .npy files but the model has {len(names)} inputs; use one folder "
                             f"per input ({', '.join(names)}) or .npz files keyed by input name")
        npy = _spread(sorted(path.glob("*.npy")))
        return ({names[0]: load_npy(f)} for f in npy), len(npy)
    images = _spread(list_images(path))
    if images:
        prep = default_preprocessing(inputs, preprocessing)
        if prep.augment and len(images) < prep.augment:
            log.info("expanding %d calibration images to %d samples: the images, then mosaics of random crops of "
                     "them; %d more views are held out for the check (--calib-augment)", len(images), prep.augment,
                     CHECK_VIEWS)
            return _image_feeds(images, inputs, prep, prep.augment), prep.augment
        return _image_feeds(images, inputs, prep), len(images)
    raise OnnxqError(f"no calibration data found in {path}; expected images (jpg/png/bmp/webp), .npy, .npz "
                     "or test_data_set_*/input_*.pb files")


def _npz_feeds(files: list[Path], names: list[str]) -> Iterator[Feed]:
    for file in files:
        yield load_npz(file)


def _per_input_npy_feeds(folders: list[Path], names: list[str]) -> Iterator[Feed]:
    stems = _spread(sorted(f.name for f in folders[0].glob("*.npy")))
    for stem in stems:
        missing = [str(folder / stem) for folder in folders if not (folder / stem).exists()]
        if missing:
            raise OnnxqError(f"calibration sample {missing[0]} is missing; every input folder needs the same files")
        yield {name: load_npy(folder / stem) for name, folder in zip(names, folders, strict=True)}


def _pb_feeds(sets: list[Path], names: list[str]) -> Iterator[Feed]:
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=lambda f: int(f.stem.split("_")[-1]))
        feed = {}
        for index, file in enumerate(files):
            tensor = _read_tensor(file)
            name = tensor.name if tensor.name in names else (names[index] if index < len(names) else tensor.name)
            feed[name] = _tensor_array(tensor, file)
        yield feed


def _read_tensor(file: Path) -> onnx.TensorProto:
    """One serialized TensorProto, or a one-line error when the file is not one."""
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(file.read_bytes())
    except (DecodeError, OSError, MemoryError, ValueError) as err:
        raise OnnxqError(f"calibration file {file} is not a serialized ONNX TensorProto ({first_line(err)}); "
                         "write it with onnx.numpy_helper.from_array(...).SerializeToString()") from err
    return tensor


def _tensor_array(tensor: onnx.TensorProto, file: Path) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, MemoryError, AssertionError) as err:
        raise OnnxqError(f"calibration file {file} holds a TensorProto numpy cannot read ({first_line(err)}); "
                         "write it with onnx.numpy_helper.from_array(...).SerializeToString()") from err


def _image_feeds(files: list[Path], inputs: list[InputSpec], preprocessing: ImagePreprocessing,
                 augmented: int = 0) -> Iterator[Feed]:
    """One feed per readable image; with ``augmented``, then random views of them (a fixed seed: the same
    samples on every run) until that many samples in all, then CHECK_VIEWS more views to hold out for the
    check (the count ``feeds_from`` reports is ``augmented``: these are not calibration samples)."""
    if len(inputs) != 1:
        raise OnnxqError(f"an image folder can only feed a single-input model, this one has {len(inputs)}; "
                         "save the inputs as .npz files keyed by input name")
    if has_dynamic_image_size(inputs[0]):
        say_image_size(inputs[0], preprocessing)
    good = []
    for file in files:
        image = read_image(file, preprocessing)  # None (with a warning) for a file that is not a usable image
        if image is None:
            continue
        good.append(file)
        yield {inputs[0].name: image}
    if not good:
        raise OnnxqError("none of the calibration images could be read; check the files")
    if not augmented:
        return
    rng = np.random.default_rng(AUGMENT_SEED)
    for _ in range(augmented - len(good)):
        yield {inputs[0].name: preprocessing.load_mosaic(good, rng)}
    rng = np.random.default_rng(CHECK_SEED)
    for index in range(CHECK_VIEWS):  # held out, natural colours: the check runs on views no statistic saw
        yield {inputs[0].name: preprocessing.load_augmented(good[index % len(good)], rng, jitter=False)}


def augmentation_key() -> str:
    """What fixes --calib-augment's views beyond the preprocessing's fields (the recipe and seed), for the
    statistics key: statistics cached from other views are not reused."""
    return f"{AUGMENT_RECIPE}, seed {AUGMENT_SEED}"


def check_samples(preprocessing: ImagePreprocessing | None) -> int:
    """Held-out samples the check of the written model runs on beyond one batch: the held-out views of
    --calib-augment (an augmented folder has no spare images, and one batch of views is a noisy check)."""
    return CHECK_VIEWS if preprocessing is not None and preprocessing.augment else 0


@functools.lru_cache(maxsize=8)
def say_image_size(spec: InputSpec, preprocessing: ImagePreprocessing) -> None:
    """Say once which size images are brought to for an input with dynamic height and width; a warning when
    nothing chose it (the 224 x 224 default), since a detector trained at 640 loses much at 224."""
    height, width = preprocessing.size
    how = "letterboxed" if preprocessing.resize_mode == "letterbox" else "resized and centre-cropped"
    if (height, width) == DEFAULT_SIZE:
        log.warning("%s has dynamic height and width: images are %s to the default %dx%d; set the size the model "
                    "was trained at with --image-size HxW (or the model's %s metadata)", spec.name, how, height,
                    width, SIZE_METADATA_KEY)
    else:
        log.info("%s has dynamic height and width: images are %s to %dx%d (--image-size or the model's metadata)",
                 spec.name, how, height, width)


def check_feed(feed: Feed, inputs: list[InputSpec]) -> Feed:
    """Validate one feed against the model inputs, adding a missing batch axis; fail with a clear line."""
    expected = {spec.name for spec in inputs}
    if not isinstance(feed, dict):
        raise OnnxqError(f"a calibration sample is a {type(feed).__name__}, not a dict of arrays; give each sample "
                         f"as {{input name: array}} with the inputs {sorted(expected)}")
    if set(feed) != expected:
        missing, extra = sorted(expected - set(feed)), sorted(set(feed) - expected)
        raise OnnxqError(f"calibration sample does not match the model inputs (missing {missing}, unexpected "
                         f"{extra}); name the arrays after the inputs {sorted(expected)}")
    return {spec.name: _check_array(np.asarray(feed[spec.name]), spec) for spec in inputs}


def _check_array(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    if array.dtype != spec.dtype:
        if array.dtype.kind != spec.dtype.kind:
            raise OnnxqError(f"calibration input {spec.name} has dtype {array.dtype} but the model expects "
                             f"{spec.dtype}; convert the data")
        array = array.astype(spec.dtype)
    if spec.shape and array.ndim == len(spec.shape) - 1 and spec.shape[0] is None:
        array = array[None]
    if spec.shape and (array.ndim != len(spec.shape) or any(
            want is not None and want != got for want, got in zip(spec.shape[1:], array.shape[1:], strict=True))):
        raise OnnxqError(f"calibration input {spec.name} has shape {list(array.shape)} but the model expects "
                         f"{['N' if d is None else d for d in spec.shape]}; check the data or preprocessing")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise OnnxqError(f"calibration input {spec.name} contains NaN or Inf; clean the data")
    return array


def is_mergeable(inputs: list[InputSpec]) -> bool:
    """Feeds can be merged and split along the leading axis when every input has a dynamic batch axis."""
    return all(spec.shape and spec.shape[0] is None for spec in inputs)


def batches(feeds: Iterable[Feed], inputs: list[InputSpec], batch_size: int, limit: int | None,
            pad: bool = False, boundary: int | None = None) -> Iterator[Feed]:
    """Validated feeds regrouped into batches of ``batch_size`` samples, at most ``limit`` samples in all.

    Feeds are only merged when every input has a dynamic leading (batch) axis; otherwise each feed is one
    sample and is passed through as it is. With ``pad``, token feeds of different lengths (a model with an
    attention mask) are padded to the batch's longest instead of run one length at a time (for statistics,
    which drop padding rows; outputs compared token by token would see the padding), after sorting them by
    length within windows that never span the ``boundary``-th sample (the calibration / held-out split).
    """
    mergeable = is_mergeable(inputs)
    mask_name = attention_mask_name(inputs)
    tokens = token_inputs(inputs, mask_name) if pad else []
    stream = _limited(feeds, inputs, limit, mergeable)
    if tokens and mergeable:
        stream = by_length(stream, mask_name, batch_size * LENGTH_WINDOW, boundary)
    pending: list[Feed] = []
    taken = 0
    for feed, rows in stream:
        if pending and not _same_shapes(pending[0], feed) and not (tokens and can_pad(pending[0], feed, mask_name,
                                                                                      tokens)):
            yield _concat(pending, tokens)
            pending = []
        pending.append(feed)
        taken += rows
        if not mergeable or sum(feed_samples(f) for f in pending) >= batch_size:
            yield _concat(pending, tokens)
            pending = []
    if pending:
        yield _concat(pending, tokens)
    if taken == 0:
        raise OnnxqError("the calibration data is empty; pass at least one sample")


def _limited(feeds: Iterable[Feed], inputs: list[InputSpec], limit: int | None,
             mergeable: bool) -> Iterator[tuple[Feed, int]]:
    """(validated feed, samples) in order, the feed that reaches ``limit`` samples cut there."""
    taken = 0
    for raw in feeds:
        feed = check_feed(raw, inputs)
        rows = feed_samples(feed) if mergeable else 1
        if mergeable and limit is not None and taken + rows > limit:
            feed = {k: v[: limit - taken] for k, v in feed.items()}
            rows = limit - taken
        if rows <= 0:
            break
        yield feed, rows
        taken += rows
        if limit is not None and taken >= limit:
            break


def feed_samples(feed: Feed) -> int:
    """Samples in a feed: the leading axis of its batched arrays (1 for scalars only)."""
    return max((v.shape[0] for v in feed.values() if np.ndim(v) > 0), default=1)


def _same_shapes(a: Feed, b: Feed) -> bool:
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def merge_feeds(feeds: list[Feed], inputs: list[InputSpec]) -> Feed:
    """Batched feeds as one (token inputs of different lengths padded to the longest)."""
    return _concat(feeds, token_inputs(inputs, attention_mask_name(inputs)))


def _concat(feeds: list[Feed], tokens: list[str]) -> Feed:
    """One feed of the feeds' samples; token inputs padded to the longest when their lengths differ."""
    if len(feeds) == 1:
        return feeds[0]
    if tokens and not all(_same_shapes(feeds[0], f) for f in feeds[1:]):
        feeds = pad_tokens(feeds, tokens)
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
