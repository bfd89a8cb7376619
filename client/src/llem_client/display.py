"""Terminal output for the CLI: rich on a terminal, plain lines otherwise.

Progress goes to stderr so that stdout stays clean for ``--json``; when stderr
is not a terminal (CI logs, pipes) every request gets one plain line instead of
a redrawn bar.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class _Bar:
    def __init__(self, display: Display, total: int, progress: Any = None, task: Any = None):
        self._d = display
        self._total = total
        self._progress = progress
        self._task = task

    def advance(self, *, output_tokens: int, energy: str, line: str) -> None:
        """One more request done; ``energy`` is the bar's energy text (no figure until one is known)."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, tokens=f"{output_tokens:,} tok", energy=energy)
        else:
            self._d.line(line)


class Display:
    """Messages, a progress bar and the summary, for a terminal or a log."""

    def __init__(self, stream: TextIO | None = None, *, rich: bool | None = None):
        self.stream = stream or sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self._console = None
        if self.rich:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    def line(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def error(self, text: str) -> None:
        if self._console is not None:
            self._console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
        else:
            print(f"error: {text}", file=self.stream, flush=True)

    @contextmanager
    def progress(self, total: int, energy: str = "") -> Iterator[_Bar]:
        """A bar over ``total`` requests; ``energy``: its energy text until the first request is done."""
        if self._console is None:
            yield _Bar(self, total)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("measuring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]}"),
            TextColumn("{task.fields[energy]}"),
            TimeElapsedColumn(),
            console=self._console,
        ) as p:
            task = p.add_task("measuring", total=total, tokens="0 tok", energy=energy)
            yield _Bar(self, total, p, task)

    def table(self, title: str, rows: list[tuple[str, str]], stream: TextIO | None = None) -> None:
        """A two-column table (rich on a terminal, ``label: value`` lines otherwise)."""
        out = stream or self.stream
        if out.isatty():
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title, show_header=False, title_justify="left")
            t.add_column(style="bold")
            t.add_column()
            for k, v in rows:
                t.add_row(k, v)
            Console(file=out, highlight=False).print(t)
        else:
            print(title, file=out)
            width = max((len(k) for k, _ in rows), default=0)
            for k, v in rows:
                print(f"  {k.ljust(width)}  {v}", file=out)
            out.flush()

    def grid(self, title: str, header: list[str], rows: list[list[str]], stream: TextIO | None = None) -> None:
        """A table with a header row."""
        out = stream or self.stream
        if out.isatty():
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for h in header:
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            Console(file=out, highlight=False).print(t)
        else:
            print(title, file=out)
            widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
            print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
            for r in rows:
                print("  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)), file=out)
            out.flush()
