"""Progress reporting: click progress bars on an interactive stderr, nothing otherwise."""

from __future__ import annotations

import sys

import click


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
        return False


def progress_factory(enabled: bool):
    """A ``(total, label) -> context manager`` for the pipeline, or None when progress is off."""
    if not (enabled and sys.stderr.isatty()):
        return None
    return lambda total, label: Progress(total, label)
