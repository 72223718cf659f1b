"""The one way onnxq writes files: staged next to their targets, then moved into place together.

Each write creates a fresh private folder (random name, created exclusively, mode 0700) in the target's folder;
the new files are created in it with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under their final names (a model's
external-data reference names its final data file, so the staged model loads as it will once in place), are
fsynced, and may be checked there. ``commit`` then renames every file over its target with ``os.replace``,
with SIGINT/SIGTERM deferred and the previous files restored if a rename fails, so a failure or a kill at any
point leaves either all the new files or all the previous ones, and no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from onnxq.errors import OnnxqError

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_COMMITTED: list[Path] = []  # every target this process has replaced, so an interruption can say what was written


def committed() -> list[Path]:
    """The files this process has written so far (complete: each was moved into place whole)."""
    return list(_COMMITTED)


def check_target(path: Path, what: str = "output") -> None:
    """Refuse a target that is not a regular file or a new path (a folder, FIFO, device such as /dev/null, socket),
    or whose folder is missing or not writable: renaming over it would replace the special file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise OnnxqError(f"cannot use {what} {path} ({err.strerror}); choose another path") from err
    if mode is not None and stat.S_ISDIR(mode):
        raise OnnxqError(f"{what} {path} is a folder; give a file name such as {path / 'model_q.onnx'}")
    if mode is not None and not stat.S_ISREG(mode):
        raise OnnxqError(f"{what} {path} is not a regular file ({_kind(mode)}); give the path of a new or "
                         "regular file")
    if not path.parent.is_dir():
        raise OnnxqError(f"{what} folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OnnxqError(f"{what} folder {path.parent} is not writable; choose another path")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


class Staging:
    """New versions of files in one folder, written under a private temporary folder, committed together."""

    def __init__(self, targets: list[Path], what: str = "output") -> None:
        self.targets = [Path(t) for t in targets]
        folders = {t.parent for t in self.targets}
        if len(folders) != 1:
            raise ValueError(f"staged files must share one folder, got {sorted(map(str, folders))}")
        for target in self.targets:
            check_target(target, what)
        self.folder = folders.pop()
        self.mode = _final_mode(self.targets[-1])  # the last target is the main file: the others follow its mode
        try:
            self.area = Path(tempfile.mkdtemp(dir=self.folder, prefix=".onnxq-", suffix=".tmp"))
        except OSError as err:
            raise OnnxqError(f"cannot write to {self.folder} ({err.strerror}); choose another path") from err

    def path(self, target: Path) -> Path:
        """Where ``target``'s new content is written before the commit (same file name, private folder)."""
        if Path(target) not in self.targets:
            raise ValueError(f"{target} is not one of the staged targets")
        return self.area / Path(target).name

    def open(self, target: Path) -> BinaryIO:
        """A new file for ``target``, created exclusively without following links."""
        return os.fdopen(os.open(self.path(target), CREATE_FLAGS, 0o600), "wb")

    def commit(self) -> list[Path]:
        """Move every staged file over its target (the last one last); returns the targets written. Targets
        without a staged file are left as they are."""
        staged = [t for t in self.targets if os.path.lexists(self.path(t))]
        try:
            for target in staged:
                _seal(self.path(target), self.mode)
        except OSError as err:
            raise OnnxqError(f"cannot write {self.targets[-1]} ({err.strerror}); nothing was replaced; check the "
                             "folder's free space") from err
        with _deferred_signals(on_hold=lambda: _COMMITTED.extend(staged)):
            done: list[tuple[Path, Path | None]] = []
            try:
                for index, target in enumerate(staged):
                    done.append((target, self._backup(target, index)))
                    os.replace(self.path(target), target)
            except BaseException as err:
                failed = done[-1][0] if done else self.targets[-1]
                for renamed, backup in reversed(done):
                    _restore(renamed, backup)
                if isinstance(err, OSError):
                    raise OnnxqError(f"cannot write {failed} ({err.strerror}); the previous file is unchanged; "
                                     "check the folder's permissions and free space") from err
                raise
            _sync_folder(self.folder)
        return staged

    def _backup(self, target: Path, index: int) -> Path | None:
        """A hard link to the current target inside the private folder, to put back if a later rename fails."""
        if not os.path.lexists(target):
            return None
        backup = self.area / f"previous-{index}"
        try:
            os.link(target, backup, follow_symlinks=False)
        except OSError:
            return target  # no hard links here: the target is left to be replaced without a way back
        return backup

    def discard(self) -> None:
        shutil.rmtree(self.area, ignore_errors=True)


def _restore(target: Path, backup: Path | None) -> None:
    """Undo one rename: the previous file back, or no file where there was none."""
    try:
        if backup is None:
            os.unlink(target)
        elif backup != target:
            os.replace(backup, target)
    except OSError:
        pass


def _final_mode(target: Path) -> int:
    """A replaced file keeps its permissions; a new one gets the usual 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask (read from /proc where it can be, so no other thread sees it changed)."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _seal(path: Path, mode: int) -> None:
    """Give a staged file its final permissions and flush it to disk before it replaces anything."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _deferred_signals(on_hold: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the renames run; the previous handler gets them afterwards. Python runs signal
    handlers in the main thread only, so elsewhere no signal can interrupt the renames and nothing is changed.
    ``on_hold`` runs when the block succeeded, before any held signal is delivered."""
    if threading.current_thread() is not threading.main_thread():
        yield
        on_hold()
        return
    received: list[tuple[int, object]] = []
    previous = {}
    for signum in DEFERRED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler set outside Python, which cannot be put back; leave it
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: received.append((number, frame)))
    try:
        yield
        on_hold()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in received[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextmanager
def staged(targets: list[Path], what: str = "output") -> Iterator[Staging]:
    """Write the targets' new versions under ``Staging.path``/``Staging.open`` inside the block (and check them
    there); they replace the targets together when the block ends, and nothing changes if it raises."""
    staging = Staging([Path(t) for t in targets], what)
    try:
        yield staging
        staging.commit()
    finally:
        staging.discard()


def write_with(path: Path, write: Callable[[BinaryIO], None], what: str = "output") -> None:
    """Write one file atomically through ``write(handle)`` (e.g. ``np.savez``); ``what`` names it in errors."""
    path = Path(path)
    try:
        with staged([path], what) as staging, staging.open(path) as handle:
            write(handle)
    except OSError as err:
        raise OnnxqError(f"cannot write {path} ({err.strerror or err}); check the folder and free space") from err


def write_bytes(path: Path, data: bytes, what: str = "output") -> None:
    write_with(path, lambda handle: handle.write(data), what)


def write_text(path: Path, text: str, what: str = "output") -> None:
    write_bytes(path, text.encode("utf-8"), what)
