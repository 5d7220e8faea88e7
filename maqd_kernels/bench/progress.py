"""A progress bar for long runs, without third-party dependencies.

On a terminal it is one line redrawn in place: done/total, percent, elapsed time, an estimate of
the time left, and the item being worked on. Written to a file or a pipe (a CI log), where
carriage returns would pile up, it prints a plain line at most every ``log_every_s`` seconds and
one at the end, so a log stays readable and still shows that the run is alive.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_CELLS = 24


def clock_text(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour up."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts `total` items of work under `title`. Call ``begin(label)`` as an item starts (the bar
    names it) and ``advance()`` when it is done; ``note(text)`` prints a line without breaking the
    bar; ``finish()`` ends it with a final line. The stream is stderr by default, so stdout keeps
    only the results."""

    def __init__(
        self,
        title: str,
        total: int,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        width: int | None = None,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.title, self.total = title, total
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.width = width
        self.log_every_s = log_every_s
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.label = ""
        self.last_logged = self.start
        self.drawn = False

    def begin(self, label: str) -> None:
        """An item starts: name it on the bar."""
        self.label = label
        if self.interactive:
            self._draw()
        elif self.clock() - self.last_logged >= self.log_every_s:
            self._log()

    def advance(self) -> None:
        """The current item is done."""
        self.done += 1
        if self.interactive:
            self._draw()

    def note(self, text: str) -> None:
        """Prints `text` on its own lines (an error, a skipped measurement) and redraws the bar below."""
        self._clear()
        self.stream.write(text.rstrip("\n") + "\n")
        if self.interactive and self.done < self.total:
            self._draw()
        self.stream.flush()

    def finish(self) -> None:
        """Replaces the bar with a last line: how many items took how long."""
        self._clear()
        elapsed = clock_text(self.clock() - self.start)
        self.stream.write(f"{self.title}: {self.done}/{self.total} in {elapsed}\n")
        self.stream.flush()

    def status(self) -> str:
        """done/total, percent, elapsed and (once something is done) the time left, e.g.
        "12/40  30%  0:21 elapsed, ~0:49 left"."""
        elapsed = self.clock() - self.start
        percent = 100 * self.done // self.total if self.total else 100
        text = f"{self.done}/{self.total} {percent:3d}%  {clock_text(elapsed)} elapsed"
        if 0 < self.done < self.total:
            # Items differ in cost (a torch.compile, a large shape), so this is a rough guide.
            text += f", ~{clock_text(elapsed / self.done * (self.total - self.done))} left"
        return text

    def line(self) -> str:
        """The bar as drawn on a terminal, cut to the terminal's width."""
        filled = BAR_CELLS * self.done // self.total if self.total else BAR_CELLS
        bar = "#" * filled + "." * (BAR_CELLS - filled)
        text = f"{self.title} [{bar}] {self.status()}  {self.label}"
        width = self.width or shutil.get_terminal_size().columns
        return text[: max(width - 1, 0)]

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self.line())
        self.stream.flush()
        self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False

    def _log(self) -> None:
        self.stream.write(f"{self.title}: {self.status()}: {self.label}\n")
        self.stream.flush()
        self.last_logged = self.clock()
