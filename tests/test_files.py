"""Files onnxq writes and caches it reads: never an input file, never a special file, never a predictable
temporary name; the previous output survives a failed check or a kill; caches are keyed and validated."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxq
import onnxq.export.atomic
import onnxq.export.qdq
import onnxq.pipeline
from onnxq.allocation.mixed import Budget
from onnxq.calibration.activations import HistogramObserver, ranges_from
from onnxq.calibration.calibrate import calibrate
from onnxq.calibration.stats_cache import STATS_FORMAT, Statistics, load_stats
from onnxq.cli import _terminate
from onnxq.errors import OnnxqError
from onnxq.export.act_qdq import calibration_candidates
from onnxq.export.atomic import Staging, staged, write_text
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare

RTN = {"method": "rtn"}


def run_model(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (names and contents), to compare before and after a run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


# --- the output is never a file the input reads, never a special file -------------------------------------------

def test_output_whose_data_file_is_the_inputs_weights_is_refused(tmp_path, cnn_calib):
    """a.onnx keeps its weights in b.onnx.data: -o b.onnx would write b.onnx.data; -o b.onnx.data is it."""
    model = tmp_path / "a.onnx"
    onnx.save(tiny.cnn_model(), str(model), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    before = snapshot(tmp_path)
    for output in (tmp_path / "b.onnx", tmp_path / "b.onnx.data", model):
        with pytest.raises(OnnxqError, match="input model|a file a.onnx reads|a.onnx reads its weights"):
            onnxq.quantize(model, cnn_calib, output, **RTN)
    result = cli(model, "--calib", cnn_calib, "-o", tmp_path / "b.onnx", "--method", "rtn")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "b.onnx.data" in result.stderr
    assert snapshot(tmp_path) == before
    x = np.ones((1, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x}), run_model(save(tiny.cnn_model(), tmp_path / "f.onnx"),
                                                                         {"x": x}))


def test_caches_that_are_the_input_or_the_output_are_refused(tmp_path, cnn_path, cnn_calib):
    out, before = tmp_path / "q.onnx", cnn_path.read_bytes()
    with pytest.raises(OnnxqError, match="is the input model"):
        onnxq.quantize(cnn_path, cnn_calib, out, stats=cnn_path, **RTN)
    with pytest.raises(OnnxqError, match="same file"):
        onnxq.quantize(cnn_path, cnn_calib, out, stats=out, **RTN)
    with pytest.raises(OnnxqError, match="same file"):
        onnxq.quantize(cnn_path, cnn_calib, out, stats=tmp_path / "q.onnx.data", **RTN)
    assert not out.exists() and cnn_path.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "dev_null", "folder", "fifo_data", "fifo_stats"])
def test_special_files_are_refused_before_any_work(tmp_path, cnn_path, cnn_calib, monkeypatch, kind):
    out, options = tmp_path / "q.onnx", {}
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "dev_null":
        out = Path("/dev/null")
    elif kind == "folder":
        out.mkdir()
    elif kind == "fifo_data":
        os.mkfifo(tmp_path / "q.onnx.data")
    else:
        os.mkfifo(tmp_path / "stats.npz")
        options["stats"] = tmp_path / "stats.npz"

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(onnxq.pipeline, "load_model_and_layout", no_work)
    with pytest.raises(OnnxqError, match="not a regular file|is a folder") as error:
        onnxq.quantize(cnn_path, cnn_calib, out, **RTN, **options)
    assert "\n" not in str(error.value)
    fifos = {"fifo": out, "fifo_data": tmp_path / "q.onnx.data", "fifo_stats": tmp_path / "stats.npz"}
    if kind in fifos:
        assert stat.S_ISFIFO(fifos[kind].stat().st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_cli_refuses_a_fifo_and_dev_null_in_one_line(tmp_path, cnn_path, cnn_calib):
    os.mkfifo(tmp_path / "pipe.onnx")
    for out in (tmp_path / "pipe.onnx", "/dev/null"):
        result = cli(cnn_path, "--calib", cnn_calib, "-o", out, "--method", "rtn")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "not a regular file" in result.stderr and "calibrating" not in result.stderr
    assert stat.S_ISFIFO((tmp_path / "pipe.onnx").stat().st_mode)


def test_reports_refuse_special_files(tmp_path):
    os.mkfifo(tmp_path / "report.json")
    with pytest.raises(OnnxqError, match="not a regular file"):
        write_text(tmp_path / "report.json", "{}", "report")
    with pytest.raises(OnnxqError, match="report folder .* does not exist"):
        write_text(tmp_path / "missing" / "report.json", "{}", "report")


# --- temporary names --------------------------------------------------------------------------------------------

def test_no_temporary_name_is_predictable(tmp_path, cnn_path, cnn_calib, monkeypatch):
    """Symlinks planted at every name an earlier onnxq used, and at the writer's own, are never followed; the
    staging folders have random names and are private."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    names = ["q.onnx", "q.onnx.data", "stats.npz", "omega.npz", "bits.json"]
    planted = [f".{n}.tmp" for n in names] + [f".{n}.tmp.npz" for n in names] + [
        f".{n}.{os.getpid()}.tmp" for n in names] + [f".{n}.{i}.tmp" for n in names for i in range(3)] + [
        ".onnxq-.tmp", ".onnxq-tmp"]
    for name in planted:
        (tmp_path / name).symlink_to(victim)
    areas: list[Path] = []
    original = Staging.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        areas.append(self.area)
        assert stat.S_IMODE(self.area.stat().st_mode) == 0o700

    monkeypatch.setattr(Staging, "__init__", record)
    for _ in range(2):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", budget=Budget(avg_bits=4.0), clado_samples=4,
                       verify_samples=0, stats=tmp_path / "stats.npz", sensitivity_cache=tmp_path / "omega.npz",
                       bits_json=tmp_path / "bits.json", external_data=True, **RTN)
    assert victim.read_bytes() == b"precious"
    assert all((tmp_path / name).is_symlink() for name in planted)
    assert len(areas) == 6 and len({a.name for a in areas}) == len(areas)  # 4 files, then bits JSON and model
    assert not any(a.exists() for a in areas)
    assert all(len(a.name) >= len(".onnxq-") + 8 + len(".tmp") for a in areas)


def test_staged_files_are_created_exclusively_without_following_links(tmp_path):
    target = tmp_path / "out.bin"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    with pytest.raises(FileExistsError), staged([target]) as staging:
        staging.path(target).symlink_to(victim)  # even inside the private folder, a link is not followed
        staging.open(target)
    assert victim.read_bytes() == b"keep" and not target.exists() and not leftovers(tmp_path)


# --- the previous output survives ---------------------------------------------------------------------------------

@pytest.fixture
def previous(tmp_path, cnn_path, cnn_calib):
    """A first run's output with its weights in q.onnx.data, mode 0640, and a snapshot of the folder."""
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    onnxq.quantize(cnn_path, cnn_calib, out, bits=8, external_data=True, **RTN)
    for path in (out, out.parent / "q.onnx.data"):
        path.chmod(0o640)
    return out, snapshot(out.parent)


@pytest.mark.parametrize("failure", [OnnxqError("check failed"), KeyboardInterrupt(), SystemExit(143)])
def test_a_failing_check_leaves_the_previous_output_unchanged(previous, cnn_path, cnn_calib, monkeypatch, failure):
    out, before = previous
    checked = []

    def failing_verify(path, reference, feed):
        checked.append(path)
        assert path != out and path.parent != out.parent and (path.parent / "q.onnx.data").exists()
        run_model(path, {"x": np.ones((1, 3, 16, 16), np.float32)})  # the staged model loads with its data
        raise failure

    monkeypatch.setattr(onnxq.pipeline, "verify", failing_verify)
    with pytest.raises(type(failure)):
        onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    assert checked and snapshot(out.parent) == before and not leftovers(out.parent)
    with pytest.raises(type(failure)):  # with a budget, the bits JSON is a result too: not written either
        onnxq.quantize(cnn_path, cnn_calib, out, budget=Budget(avg_bits=3.0), clado_samples=4, verify_samples=0,
                       bits_json=out.parent / "bits.json", external_data=True, **RTN)
    assert snapshot(out.parent) == before and not leftovers(out.parent)


def test_a_real_sigterm_during_the_check_leaves_the_previous_output(previous, cnn_path, cnn_calib, monkeypatch):
    out, before = previous

    def killed_verify(path, reference, feed):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the check")

    monkeypatch.setattr(onnxq.pipeline, "verify", killed_verify)
    old = signal.signal(signal.SIGTERM, _terminate)  # what the CLI installs
    try:
        with pytest.raises(KeyboardInterrupt):
            onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert snapshot(out.parent) == before and not leftovers(out.parent)


def test_a_failed_rename_restores_the_previous_data(previous, cnn_path, cnn_calib, monkeypatch):
    """The data file is moved first; when the model's rename fails, the previous data comes back."""
    out, before = previous
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise PermissionError(1, "Operation not permitted")
        real_replace(src, dst)

    monkeypatch.setattr(onnxq.export.atomic.os, "replace", replace)
    with pytest.raises(OnnxqError, match="previous file is unchanged"):
        onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    assert snapshot(out.parent) == before and not leftovers(out.parent)


def interrupt_after_each_rename(monkeypatch) -> None:
    """Every rename of the atomic writer is followed by a SIGINT (Ctrl-C), which arrives between the data's rename
    and the model's. It is sent to the main thread: sent to the process, the kernel may hand it to a busy worker
    thread (onnxruntime, BLAS) whose C handler runs only after the renames, so under load it would arrive late."""
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(onnxq.export.atomic.os, "replace", replace)


def test_signals_during_the_renames_wait_until_both_are_done(previous, cnn_path, cnn_calib, monkeypatch):
    out, before = previous
    interrupt_after_each_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    after = snapshot(out.parent)
    assert after["q.onnx"] != before["q.onnx"] and after["q.onnx.data"] != before["q.onnx.data"]
    run_model(out, {"x": np.ones((1, 3, 16, 16), np.float32)})  # the new pair, complete
    assert not leftovers(out.parent)


def test_permissions_follow_the_previous_model_file(previous, cnn_path, cnn_calib):
    out, _ = previous
    onnxq.quantize(cnn_path, cnn_calib, out, bits=4, external_data=True, **RTN)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((out.parent / "q.onnx.data").stat().st_mode) == 0o640
    new = out.parent / "new.onnx"
    umask = os.umask(0o027)
    try:
        onnxq.quantize(cnn_path, cnn_calib, new, bits=4, external_data=True, **RTN)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE((out.parent / "new.onnx.data").stat().st_mode) == 0o640


# --- the statistics cache: keyed, said, validated ---------------------------------------------------------------

def other_calib(tmp_path: Path, name: str = "other") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(20):
        np.save(folder / f"{i:03d}.npy", 3 * rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
    return folder


def test_cache_from_another_calibration_folder_is_rejected_with_the_reason(tmp_path, cnn_path, cnn_calib):
    stats = tmp_path / "stats.npz"
    first = cli(cnn_path, "--calib", cnn_calib, "-o", tmp_path / "a.onnx", "--stats", stats, "--method", "rtn")
    assert first.returncode == 0 and stats.exists(), first.stderr
    other = other_calib(tmp_path)
    second = cli(cnn_path, "--calib", other, "-o", tmp_path / "b.onnx", "--stats", stats, "--method", "rtn")
    assert second.returncode == 0, second.stderr
    assert "not reusing" in second.stderr and "other calibration data" in second.stderr and str(other) in second.stderr
    fresh = cli(cnn_path, "--calib", other, "-o", tmp_path / "c.onnx", "--method", "rtn")
    assert fresh.returncode == 0
    a, b, c = (initializers(tmp_path / f"{n}.onnx") for n in "abc")
    assert all(np.array_equal(b[k], c[k]) for k in b) and not all(np.array_equal(a[k], b[k]) for k in a)
    third = cli(cnn_path, "--calib", other, "-o", tmp_path / "d.onnx", "--stats", stats, "--method", "rtn")
    assert "reusing calibration statistics" in third.stderr and "calibrating" not in third.stderr


@pytest.mark.parametrize("change", ["one_file_edited", "file_added", "calib_size", "preprocessing", "weights",
                                    "layer_set"])
def test_every_key_entry_invalidates_the_cache(tmp_path, cnn_path, cnn_calib, caplog, change):
    stats = tmp_path / "stats.npz"
    onnxq.quantize(cnn_path, cnn_calib, tmp_path / "a.onnx", stats=stats, **RTN)
    model, options = cnn_path, {}
    if change == "one_file_edited":
        sample = cnn_calib / "005.npy"
        np.save(sample, np.load(sample) + 1)
    elif change == "file_added":
        np.save(cnn_calib / "zzz.npy", np.zeros((1, 3, 16, 16), np.float32))
    elif change == "calib_size":
        options["calib_size"] = 10
    elif change == "preprocessing":
        options["preprocessing"] = onnxq.data.images.ImagePreprocessing(mean=(0.5, 0.5, 0.5))
    elif change == "weights":
        edited = tiny.cnn_model()
        edited.graph.initializer[1].raw_data = np.full(8, 0.5, np.float32).tobytes()  # a bias, not a layer weight
        model = save(edited, tmp_path / "edited.onnx")
    else:
        options["nodes_to_exclude"] = ("fc",)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(model, cnn_calib, tmp_path / "b.onnx", stats=stats, **RTN, **options)
    assert any("not reusing" in r.message for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(model, cnn_calib, tmp_path / "c.onnx", stats=stats, **RTN, **options)
    assert any("reusing calibration statistics" in r.message for r in caplog.records), caplog.text


def test_samples_given_in_python_are_hashed(tmp_path, cnn_path, caplog):
    rng = np.random.default_rng(3)
    samples = [{"x": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    stats = tmp_path / "stats.npz"
    onnxq.quantize(cnn_path, samples, tmp_path / "a.onnx", stats=stats, **RTN)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, iter(samples), tmp_path / "b.onnx", stats=stats, **RTN)  # one-shot, same values
    assert "reusing calibration statistics" in caplog.text
    caplog.clear()
    changed = [{"x": s["x"] * 2} for s in samples]
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, (s for s in changed), tmp_path / "c.onnx", stats=stats, **RTN)
    assert "other calibration data" in caplog.text
    onnxq.quantize(cnn_path, changed, tmp_path / "d.onnx", **RTN)
    c, d = initializers(tmp_path / "c.onnx"), initializers(tmp_path / "d.onnx")
    assert all(np.array_equal(c[k], d[k]) for k in c)


def crafted_cache(path: Path, edit) -> None:
    """Rewrite a cache with its header copied and one array edited (an attacker's or a broken disk's file)."""
    with np.load(path) as data:
        arrays = {k: data[k].copy() for k in data.files}
    edit(arrays)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def nan_gram(a): a["gram_0"][0, 0, 0] = np.nan  # noqa: E704
def wrong_shape(a): a["gram_1"] = a["gram_1"][:, :-1, :-1]  # noqa: E704
def negative_rows(a): a["info_2"][0] = -5  # noqa: E704
def negative_diagonal(a): a["gram_0"][0, 1, 1] = -1.0  # noqa: E704
def object_array(a): a["rowsum_0"] = np.array([None, 1], dtype=object)  # noqa: E704
def huge_mean(a): a["rowsum_3"] = a["rowsum_3"] + 1e6  # noqa: E704
def swapped_range(a): a["info_0"][1:3] = a["info_0"][2:0:-1]  # noqa: E704
def missing_array(a): del a["rowsum_1"]  # noqa: E704
def bad_header(a): a["header"] = np.frombuffer(b"{not json", np.uint8)  # noqa: E704


@pytest.mark.parametrize("edit", [nan_gram, wrong_shape, negative_rows, negative_diagonal, object_array, huge_mean,
                                  swapped_range, missing_array, bad_header])
def test_a_bad_statistics_cache_is_recomputed_not_used(tmp_path, cnn_path, cnn_calib, caplog, edit):
    stats = tmp_path / "stats.npz"
    onnxq.quantize(cnn_path, cnn_calib, tmp_path / "a.onnx", stats=stats, **RTN)
    crafted_cache(stats, edit)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "b.onnx", stats=stats, **RTN)
    warnings = [r.message for r in caplog.records if "not reusing" in r.message]
    assert len(warnings) == 1 and "\n" not in warnings[0], caplog.text
    a, b = initializers(tmp_path / "a.onnx"), initializers(tmp_path / "b.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # recalibrated: the same model as without the bad cache
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):  # and the cache was rewritten, valid
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "c.onnx", stats=stats, **RTN)
    assert "reusing calibration statistics" in caplog.text


def test_a_file_that_is_not_a_cache_is_neither_used_nor_overwritten(tmp_path, cnn_path, cnn_calib):
    stats = tmp_path / "notes.txt"
    stats.write_bytes(b"my notes, not statistics\n")
    result = cli(cnn_path, "--calib", cnn_calib, "-o", tmp_path / "q.onnx", "--stats", stats, "--method", "rtn")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "notes.txt" in line]
    assert any("not an .npz file" in line for line in lines) and any("not caching" in line for line in lines)
    assert stats.read_bytes() == b"my notes, not statistics\n"


def test_save_and_load_round_trip(tmp_path):
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    tensors = calibration_candidates(model, layers)
    observer = HistogramObserver(tensors)
    stats = calibrate(model, layers, [{"x": x}], observers=[observer])
    path = tmp_path / "stats.npz"
    key = {"format": STATS_FORMAT, "model": "m", "data": {"samples": 1, "hash": "h"}, "preprocessing": {},
           "calib_size": None, "layers": [layer.name for layer in layers]}
    Statistics(stats, observer.hists, key).save(path)
    loaded = load_stats(path, key, layers, tensors, histograms=True)
    assert list(loaded.layers) == list(stats) and list(loaded.activations) == tensors
    for name in stats:
        np.testing.assert_array_equal(loaded.layers[name].gram, stats[name].gram)
        np.testing.assert_array_equal(loaded.layers[name].row_sum, stats[name].row_sum)
        assert (loaded.layers[name].rows, loaded.layers[name].samples) == (stats[name].rows, 4)
    for tensor, hist in observer.hists.items():  # the restored histograms give the very same ranges
        assert ranges_from({tensor: loaded.activations[tensor]}) == ranges_from({tensor: hist})
        assert ranges_from({tensor: loaded.activations[tensor]}, "percentile") == ranges_from({tensor: hist},
                                                                                               "percentile")
    assert load_stats(path, {**key, "model": "other"}, layers) is None
    assert load_stats(path, key, layers, [*tensors, "unseen"], histograms=True) is None  # activations it lacks
    Statistics(stats, {}, key).save(path)
    assert load_stats(path, key, layers).layers.keys() == stats.keys()  # weight-only runs need no activations
    assert load_stats(path, key, layers, tensors, histograms=False) is None
    assert not leftovers(tmp_path)


# --- the sensitivity cache ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["nan", "shape", "asymmetric", "garbage"])
def test_a_bad_sensitivity_cache_is_measured_again(tmp_path, cnn_path, cnn_calib, caplog, edit):
    cache = tmp_path / "omega.npz"
    options = {"budget": Budget(avg_bits=3.0), "clado_samples": 4, "verify_samples": 0, "sensitivity_cache": cache}
    first = onnxq.quantize(cnn_path, cnn_calib, tmp_path / "a.onnx", **RTN, **options)
    if edit == "garbage":
        cache.write_bytes(cache.read_bytes()[:100])
    else:
        def change(arrays):
            omega = arrays["omega"]
            if edit == "nan":
                omega[0, 0] = np.nan
            elif edit == "asymmetric":
                omega[0, 1] += 1.0
            else:
                arrays["omega"] = omega[:-1, :-1]
        crafted_cache(cache, change)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        second = onnxq.quantize(cnn_path, cnn_calib, tmp_path / "b.onnx", **RTN, **options)
    assert "not reusing" in caplog.text and "measuring sensitivities" in caplog.text
    np.testing.assert_array_equal(second.mixed.omega, first.mixed.omega)
    assert second.mixed.bits == first.mixed.bits


# --- report JSON ---------------------------------------------------------------------------------------------------

def test_bits_json_and_reports_go_through_the_writer(tmp_path, monkeypatch, cnn_path, cnn_calib):
    written = []
    original = Staging.commit

    def record(self):
        targets = original(self)
        written.extend(targets)
        return targets

    monkeypatch.setattr(Staging, "commit", record)
    onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", budget=Budget(avg_bits=4.0), clado_samples=4,
                   verify_samples=0, bits_json=tmp_path / "bits.json", stats=tmp_path / "s.npz",
                   sensitivity_cache=tmp_path / "o.npz", **RTN)
    from onnxq.report.html_report import report_context, write_report_json

    write_report_json(tmp_path / "r.json", report_context(tmp_path / "q.onnx", cnn_path, []))
    assert {p.name for p in written} == {"q.onnx", "bits.json", "s.npz", "o.npz", "r.json"}
    assert json.loads((tmp_path / "bits.json").read_text())["bits"]


# --- fuzz: damaged calibration files, caches and models -------------------------------------------------------

NPY_DTYPES = ["<f4", "<f8", ">f4", "<f2", "|O", "<i8", "|u1", "|b1", "<U5", "<c8", "|V4", "<M8[s]"]


@st.composite
def damage(draw):
    """Which file to damage and how: random bytes, a truncation, or a random numpy header with random data."""
    target = draw(st.sampled_from(["calib", "stats", "stats_member", "model"]))
    kind = draw(st.sampled_from(["bytes", "truncate", "npy_header"]))
    header = {"descr": draw(st.sampled_from(NPY_DTYPES)), "fortran_order": draw(st.booleans()),
              "shape": tuple(draw(st.lists(st.integers(0, 20), max_size=4)))}
    return target, kind, draw(st.binary(max_size=3000)), draw(st.floats(0, 1)), header, draw(st.integers(0, 5))


def damaged_bytes(original: bytes, kind: str, data: bytes, fraction: float, header: dict) -> bytes:
    if kind == "bytes":
        return data
    if kind == "truncate":
        return original[: int(len(original) * fraction)]
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> Path:
    """A model, its calibration .npy files, a statistics cache and a previous output, made once."""
    base = tmp_path_factory.mktemp("fuzz_base")
    save(tiny.cnn_model(), base / "model.onnx")
    (base / "calib").mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        np.save(base / "calib" / f"{i}.npy", rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
    onnxq.quantize(base / "model.onnx", base / "calib", base / "out.onnx", stats=base / "stats.npz", **RTN)
    return base


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damage())
def test_damaged_files_give_a_model_or_one_line(tmp_path_factory, fuzz_base, case):
    import shutil
    import zipfile

    from click.testing import CliRunner

    from onnxq.cli import cli as command

    target, kind, data, fraction, header, index = case
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(fuzz_base, folder, dirs_exist_ok=True)
    if target == "stats_member":
        with zipfile.ZipFile(fuzz_base / "stats.npz") as source, zipfile.ZipFile(folder / "stats.npz", "w") as out:
            for name in source.namelist():
                content = source.read(name)
                if name == f"gram_{index % 4}.npy":
                    content = damaged_bytes(content, kind, data, fraction, header)
                out.writestr(name, content)
    else:
        path = {"calib": folder / "calib" / f"{index}.npy", "stats": folder / "stats.npz",
                "model": folder / "model.onnx"}[target]
        path.write_bytes(damaged_bytes(path.read_bytes(), kind, data, fraction, header))
    inputs = snapshot(folder / "calib") | {"model.onnx": (folder / "model.onnx").read_bytes()}
    previous = (folder / "out.onnx").read_bytes()
    result = CliRunner().invoke(command, [str(folder / "model.onnx"), "--calib", str(folder / "calib"), "-o",
                                          str(folder / "out.onnx"), "--stats", str(folder / "stats.npz"),
                                          "--method", "rtn", "-q"], standalone_mode=False)
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert snapshot(folder / "calib") | {"model.onnx": (folder / "model.onnx").read_bytes()} == inputs
    assert not leftovers(folder)
    if result.exit_code == 0:
        run_model(folder / "out.onnx", {"x": np.ones((1, 3, 16, 16), np.float32)})
        return
    assert isinstance(result.exception, OnnxqError), f"{type(result.exception).__name__}: {result.exception}"
    assert "\n" not in str(result.exception)
    assert (folder / "out.onnx").read_bytes() == previous


def test_a_sensitivity_cache_from_other_data_is_measured_again(tmp_path, cnn_path, cnn_calib, caplog):
    cache = tmp_path / "omega.npz"
    options = {"budget": Budget(avg_bits=3.0), "clado_samples": 4, "verify_samples": 0, "sensitivity_cache": cache}
    onnxq.quantize(cnn_path, cnn_calib, tmp_path / "a.onnx", **RTN, **options)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, other_calib(tmp_path), tmp_path / "b.onnx", **RTN, **options)
    assert "measured for another model, data or options" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "c.onnx", symmetric=True, **RTN, **options)
    assert "measured for another model, data or options" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "d.onnx", symmetric=True, **RTN, **options)
    assert "reusing the sensitivity matrix" in caplog.text


def test_a_missing_calibration_path_with_a_cache_is_one_error(tmp_path, cnn_path, cnn_calib):
    stats = tmp_path / "stats.npz"
    onnxq.quantize(cnn_path, cnn_calib, tmp_path / "a.onnx", stats=stats, **RTN)
    result = cli(cnn_path, "--calib", tmp_path / "missing", "-o", tmp_path / "b.onnx", "--stats", stats)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr


# --- full disks, immutable files, interruptions after the write, bad bit files, report paths ----------------------

@pytest.mark.parametrize("where", ["save", "fsync"])
def test_a_full_disk_is_one_line_and_leaves_the_previous_output(previous, cnn_path, cnn_calib, monkeypatch, where):
    out, before = previous
    full = OSError(28, "No space left on device")
    if where == "save":
        real_save = onnx.save

        def save_model(model, path, **kwargs):
            if ".onnxq-" in str(path):  # the staged output only (prepare writes a temporary copy too)
                raise full
            real_save(model, path, **kwargs)
        monkeypatch.setattr(onnxq.export.qdq.onnx, "save", save_model)
    else:
        def fsync(fd):
            raise full
        monkeypatch.setattr(onnxq.export.atomic.os, "fsync", fsync)
    with pytest.raises(OnnxqError, match="No space left on device") as err:
        onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    assert "space" in str(err.value).split(";")[-1]  # the fix is named
    assert snapshot(out.parent) == before and not leftovers(out.parent)


def test_an_interruption_during_the_renames_says_what_was_written(previous, cnn_path, cnn_calib, monkeypatch):
    from onnxq.cli import _what_was_written

    out, _ = previous
    monkeypatch.setattr(onnxq.export.atomic, "_COMMITTED", [])
    assert _what_was_written() == "nothing was written"
    interrupt_after_each_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(cnn_path, cnn_calib, out, bits=2, external_data=True, **RTN)
    assert str(out) in _what_was_written() and str(out.parent / "q.onnx.data") in _what_was_written()


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "JSON list, not an object"),
    ('{"bits": [8]}', "must map layer names to widths"),
    ('{"bits": {"conv1": 5}}', "width 5"),
    ('{"bits": {"conv1": "eight"}}', "width 'eight'"),
    ('{"bits": {"conv1": true}}', "width True"),
    ('{"w": {"quant_type": "QInt4"}}', "neither an onnxq bit assignment"),
    ('{"bits": {"nosuchlayer": 8}}', "unknown layers"),
])
def test_bad_bits_json_content_is_one_line(tmp_path, cnn_path, cnn_calib, content, message):
    bits = tmp_path / "bits.json"
    bits.write_text(content)
    with pytest.raises(OnnxqError, match=message):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", bits_json=bits, **RTN)
    assert not (tmp_path / "q.onnx").exists()


def test_eval_checks_report_paths_before_the_evaluation(tmp_path, cnn_path):
    data = tmp_path / "data.npy"
    np.save(data, np.ones((2, 3, 16, 16), np.float32))
    os.mkfifo(tmp_path / "fifo")
    for flag, path, message in (("--report-json", tmp_path / "missing" / "r.json", "does not exist"),
                                ("--report-json", cnn_path, "is the input model"),
                                ("--report", tmp_path / "fifo", "not a regular file")):
        result = cli("eval", cnn_path, "--reference", cnn_path, "--data", data, flag, path)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "agreement" not in result.stdout  # refused before the evaluation ran
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_temporary_folder_is_one_line_from_the_cli(tmp_path, cnn_path, cnn_calib, monkeypatch, capsys):
    """A full disk met outside the output's writer (a temporary copy, a spill file) is the machine's state:
    one line naming TMPDIR, exit 1, no 'internal error'."""
    import onnxq.cli

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/tmp/onnxq-x/in.onnx")

    monkeypatch.setattr(onnxq.pipeline, "prepare", full)
    argv = ["onnxq", str(cnn_path), "--calib", str(cnn_calib), "-o", str(tmp_path / "q.onnx")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        onnxq.cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 1 and len(err.splitlines()) == 1
    assert "No space left on device writing /tmp/onnxq-x/in.onnx" in err and "TMPDIR" in err
    assert "internal error" not in err and not (tmp_path / "q.onnx").exists()


def test_a_calibration_folder_is_hashed_once_per_process_until_it_changes(tmp_path, cnn_calib, monkeypatch):
    """--stats and --sensitivity-cache both key on the folder: its files are read once, and again only when one
    of them changes (size or modification time)."""
    from onnxq.calibration import stats_cache

    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(stats_cache, "_HASHED", {})
    monkeypatch.setattr(stats_cache, "open", counting_open, raising=False)
    first = stats_cache.data_identity(cnn_calib)
    assert len(opened) == 20 and stats_cache.data_identity(cnn_calib) == first and len(opened) == 20
    np.save(cnn_calib / "000.npy", np.zeros((1, 3, 16, 16), np.float32))
    os.utime(cnn_calib / "000.npy", ns=(1, 1))  # a change the size alone would not show
    changed = stats_cache.data_identity(cnn_calib)
    assert len(opened) == 40 and changed["hash"] != first["hash"]
