"""Progress reporting: a click progress bar per phase on an interactive stderr, plain lines elsewhere (logs,
CI, notebooks); either way each phase ends with a line saying how long it took, so a user sees where the time
goes."""

from __future__ import annotations

import re
import sys
import time

import click

LINE_SECONDS = 5.0  # a non-interactive stderr gets a progress line at most this often
PROGRESS_LINE = re.compile(r"^[^:]+: (done in \d+\.\d s|\d+(/\d+)? after \d+ s(, about \d+ s left)?)$")


def without_progress(text: str) -> list[str]:
    """The non-empty lines of a run's stderr other than progress lines (what a user must read)."""
    return [line for line in text.splitlines() if line.strip() and not PROGRESS_LINE.match(line.strip())]


class NoProgress:
    """The do-nothing progress bar used by the Python API and in non-interactive runs."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int) -> None:
        """Ignore progress."""


class Progress(NoProgress):
    """A click progress bar on stderr (a plain counter when the total is unknown)."""

    def __init__(self, total: int | None, label: str) -> None:
        self.total, self.label, self.done, self.bar = total, label, 0, None

    def __enter__(self) -> Progress:
        self.start = time.perf_counter()
        if self.total:
            self.bar = click.progressbar(length=self.total, label=self.label, file=sys.stderr,
                                         show_pos=True).__enter__()
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            click.echo(f"\r{self.label}: {self.done}", err=True, nl=False)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.done:
            click.echo("", err=True)
        if exc[0] is None:
            click.echo(f"{self.label}: done in {time.perf_counter() - self.start:.1f} s", err=True)
        return False


class LineProgress(NoProgress):
    """Progress as plain lines (no carriage returns): one every ``LINE_SECONDS`` with an ETA from the rate so far,
    and the phase's time at the end (nothing for a phase that fails at once, so its error stays the only line)."""

    def __init__(self, total: int | None, label: str) -> None:
        self.total, self.label, self.done = total, label, 0

    def __enter__(self) -> LineProgress:
        self.start = self.last = time.perf_counter()
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < LINE_SECONDS:
            return
        self.last = now
        elapsed = now - self.start
        line = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + f" after {elapsed:.0f} s"
        if self.total and self.done:
            line += f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
        click.echo(line, err=True)

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            click.echo(f"{self.label}: done in {time.perf_counter() - self.start:.1f} s", err=True)
        return False


def progress_factory(enabled: bool):
    """A ``(total, label) -> context manager`` for the pipeline, or None when progress is off (``-q``)."""
    if not enabled:
        return None
    kind = Progress if sys.stderr.isatty() else LineProgress
    return lambda total, label: kind(total, label)
