"""Small helpers every benchmark script shares: timing, machine description, tables, JSON.

A benchmark number is only worth something next to *how* it was taken and *where*.  These
helpers make that cheap:

* :func:`time_fn` runs a function ``warmup`` times untimed, then ``repeats`` times timed, and
  returns every sample plus the median / minimum (:class:`TimingResult`).  Report the median
  (robust to one slow run caused by another process) unless the script says otherwise.
* :class:`Timer` is a context manager for timing one block: ``with Timer() as t: ...;
  t.seconds``.
* :func:`set_threads` pins ``torch``'s intra-op thread count (default: the cores this process
  may use) so that every mode of a comparison runs with the same setting.
* :func:`machine_description` / :func:`format_machine` say where the numbers came from (CPU
  model, cores, threads, torch / Python versions), from the machine helpers training uses too
  (:mod:`transformer.machine`: ``available_cores``, ``cpu_model``, ``load_average``).
* :func:`markdown_table` / :func:`print_table` render rows as a GitHub-markdown table.
* :func:`write_results` saves the numbers (JSON) and, optionally, the tables (Markdown) side
  by side, so a README number can be traced back to a file and a command.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from transformer.machine import available_cores, cpu_model, load_average  # noqa: F401  (re-exported)


# --------------------------------------------------------------------------- timing
@dataclass
class TimingResult:
    """Wall-clock samples of one measured function, in seconds.

    ``median`` is what benchmarks report by default; ``min`` ("best of") is the least
    disturbed run; ``samples`` keeps every run so a reader can judge the spread.
    """

    samples: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def to_dict(self) -> Dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "mean_s": self.mean, "samples_s": list(self.samples)}


class Timer:
    """Time one block with ``time.perf_counter``::

        with Timer() as t:
            work()
        print(t.seconds)
    """

    def __enter__(self) -> "Timer":
        self.seconds = float("nan")
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> TimingResult:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns a :class:`TimingResult` with the ``repeats`` samples (seconds).  Warm-up runs
    absorb one-off costs (lazy initialisation, allocator growth, kernel selection) that a
    steady-state number should not include.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        samples.append(t.seconds)
    return TimingResult(samples)


# --------------------------------------------------------------------------- machine
# The machine helpers are shared with training (transformer/machine.py): one answer to "how many
# cores may this process use", "which CPU is this", "how busy is it".


def set_threads(num_threads: Optional[int] = None) -> int:
    """Set ``torch.set_num_threads`` (default: :func:`available_cores`) and return the value used."""
    n = available_cores() if num_threads is None else num_threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_description() -> Dict[str, Any]:
    """Where a benchmark ran: CPU model, cores, torch threads, versions, date (a JSON-able dict)."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "load_average": load_average(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_machine(desc: Dict[str, Any]) -> str:
    """One readable line for the top of a results table."""
    return (f"{desc['cpu']}, {desc['available_cores']} cores available ({desc['logical_cpus']} logical), "
            f"torch {desc['torch']} with {desc['torch_threads']} intra-op threads, Python {desc['python']}, "
            f"{desc['platform']}, {desc['date_utc']}"
            + (f", load average {desc['load_average'][0]:g}" if desc.get("load_average") else ""))


# --------------------------------------------------------------------------- command-line lists
def _number_list(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> tuple:
    import argparse

    try:
        values = tuple(convert(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} like 1,2,4, got {text!r}")
    if not values or not all(ok(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def int_list(text: str) -> tuple:
    """argparse ``type``: ``"256,1024"`` -> ``(256, 1024)``; positive integers only."""
    return _number_list(text, int, lambda v: v >= 1, "positive integers")


def float_list(text: str) -> tuple:
    """argparse ``type``: ``"0,0.8"`` -> ``(0.0, 0.8)``; numbers >= 0 only."""
    return _number_list(text, float, lambda v: v >= 0, "numbers >= 0")


# --------------------------------------------------------------------------- tables
def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return format(value, floatfmt)
    return str(value)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".3g") -> str:
    """Render ``rows`` (sequences of cells) as a GitHub-markdown table.

    Floats use ``floatfmt``; ``None`` / NaN print as ``-``; strings are used as given (format
    them yourself when a column needs a special format).  Numeric columns are right-aligned.
    """
    cells = [[_cell(v, floatfmt) for v in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)} (one per header)")
    numeric = [all(isinstance(r[j], (int, float)) and not isinstance(r[j], bool) or r[j] is None for r in rows)
               and bool(rows) for j in range(len(headers))]
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]
    widths = [max(w, 3) for w in widths]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(list(headers)), sep] + [line(r) for r in cells])


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: Optional[str] = None,
                floatfmt: str = ".3g", file=None) -> str:
    """Print (and return) a markdown table, preceded by ``### title`` when given."""
    text = markdown_table(rows, headers, floatfmt)
    if title:
        text = f"### {title}\n\n{text}"
    print(text + "\n", file=file or sys.stdout, flush=True)
    return text


# --------------------------------------------------------------------------- results
def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_results(path, results: Dict[str, Any], machine: Optional[Dict[str, Any]] = None,
                  command: Optional[str] = None, markdown: Optional[str] = None) -> Path:
    """Save ``results`` as JSON at ``path`` (directories created), with the machine and command.

    When ``markdown`` is given it is also written next to the JSON (same name, ``.md``), so the
    tables a reader sees and the numbers a script reads come from the same run.
    Returns the JSON path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine if machine is not None else machine_description(),
        "command": command if command is not None else " ".join([Path(sys.executable).name] + sys.argv),
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    return path
