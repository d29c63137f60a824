"""Progress and diagnostics on stderr (results go to stdout): one bar per long stage with
its elapsed time and ETA, and one line per finished stage saying how long it took.

    console = stderr_console()
    with progress(console) as bars:
        bar = bars.add_task("replay settings", total=40)
        ...; bars.advance(bar)
    with stage(console, "trace pass"):     # -> "trace pass: done in 3.2 s"
        ...

`OURO_LAB_PROGRESS=0` turns the bars off (tests; logs of batch jobs).
"""

from __future__ import annotations

import contextlib
import os
import time


def stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def stdout_console():
    """The result's console. Piped into a file or a log, rich would wrap tables at 80
    columns, mid-word; there it takes 160 unless `COLUMNS` says otherwise."""
    from rich.console import Console

    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(width=160)


def progress(console):
    """Bars with what is done, of how many, elapsed time and the estimated time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
                    disable=os.environ.get("OURO_LAB_PROGRESS") == "0")


def log(console, msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)  # one line, however narrow


@contextlib.contextmanager
def stage(console, name: str, announce: bool = True):
    """Say that a stage starts (unless `announce` is False: a stage whose errors must stay
    the only line), and when it ends how long it took."""
    if announce:
        log(console, f"{name} ...")
    t0 = time.perf_counter()
    yield
    log(console, f"{name}: done in {time.perf_counter() - t0:.1f} s")
