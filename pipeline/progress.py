"""Progress that reads well where it ends up: a tqdm bar in a terminal, plain lines in a file.

A tqdm bar redraws itself with carriage returns and (in Ray workers) colour codes; written to
a log file or a CI log that is one unreadable line per redraw. `progress()` returns the bar
when its stream is a terminal, else a `LineProgress` with the same calls (`update`,
`set_postfix`, `close`, a context manager) that writes one plain line at most every
`interval_s` seconds and one at the end, and nothing at all for an empty total.

    with progress(total=len(names), desc="DAVIS sequences", unit="seq") as bar:
        bar.update(1)
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

INTERVAL_S = 30.0  # seconds between plain progress lines


class LineProgress:
    """tqdm's interface, as periodic plain lines: `desc: n/total unit (p%), r unit/s, k=v`."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        stream: TextIO,
        interval_s: float = INTERVAL_S,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.interval_s, self.n, self.initial = interval_s, initial, initial
        self.postfix = ""
        self.written = -1  # the count the last line showed
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any):
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.3g} {self.unit}/s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def write(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.written = self.n

    def close(self) -> None:
        if not self.closed and self.total and self.written != self.n:  # the last line once
            self.write()
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoProgress(LineProgress):
    """Counts, writes nothing (`enabled=False`, e.g. ranks other than 0)."""

    def write(self) -> None:
        pass


def progress(
    total: int,
    desc: str,
    unit: str,
    *,
    enabled: bool = True,
    stream: TextIO | None = None,
    initial: int = 0,
    interval_s: float = INTERVAL_S,
):
    """A tqdm bar on a terminal, else a LineProgress (see module docstring)."""
    stream = stream or sys.stderr
    if not enabled:
        return NoProgress(total, desc, unit, stream, interval_s, initial)
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, initial=initial)
    return LineProgress(total, desc, unit, stream, interval_s, initial)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
