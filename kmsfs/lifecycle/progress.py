"""The lifecycle tools' progress bar (files, percentage, ETA) on a terminal."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import click


class Progress:
    """A progress bar (files, percentage, ETA: ``click.progressbar``) on a terminal;
    silent otherwise.  Attributes: done (files counted), enabled."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done = 0
        self._bar: Any = None
        if self.enabled:
            self._bar = click.progressbar(
                length=max(total, 1), label=label, file=stream, show_pos=True, show_eta=True
            )
            self._bar.__enter__()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
