"""Build the teaching notebooks from the Python sources next to this file, and run them.

Each notebook is written as a plain Python file in ``notebooks/src/``, in the "percent" format
that Jupytext, VS Code and Spyder understand: a line ``# %%`` starts a code cell and a line
``# %% [markdown]`` starts a Markdown cell, whose lines are comments (``# `` is stripped).
Editing a ``.py`` file and rerunning this script is easier to review than editing JSON.

A code cell marked ``# %% tags=["exercise"]`` is a "predict, then run" exercise: it is executed
like every other cell (so its code is tested), but saved *without* its output, so that a reader
makes a prediction before seeing the answer.  The answer goes in the Markdown cell after it,
folded inside ``<details>``.

    python notebooks/_build.py                 # rebuild and execute every notebook
    python notebooks/_build.py 02_sampling     # only the notebooks whose name starts with that
    python notebooks/_build.py --no-execute    # write the cells without outputs

The notebooks are executed with ``nbclient`` in the ``notebooks/`` folder (the kernel is the
``python3`` kernel of the running interpreter, which ``ipykernel`` provides) the way a student
opens them after ``pip install -e ".[notebooks]" && jupyter lab notebooks/``: with only the
installed packages importable, never the repository root (``PYTHONPATH`` is removed), and saved
*with* their outputs, so they read well where they are rendered.  ``tests/test_notebooks.py``
executes the same ``.ipynb`` files on every CI run, in the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
EXERCISE = "exercise"  # the tag of a "predict, then run" cell: executed, saved without outputs


def _marker_tags(line: str) -> List[str]:
    """The tags of a cell marker line, ``# %% tags=["exercise"]`` -> ``["exercise"]``."""
    if "tags=" not in line:
        return []
    tags = json.loads(line.split("tags=", 1)[1].strip())
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"tags= must be a JSON list of strings: {line!r}")
    return tags


def parse_cells(text: str):
    """Split a percent-format source into ``(kind, source, tags)`` triples, ``kind`` "code" or
    "markdown", ``tags`` the list given on the marker line (usually empty)."""
    cells: List[list] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# %%"):
            cells.append(["markdown" if "[markdown]" in stripped else "code", [], _marker_tags(stripped)])
            continue
        if not cells:
            if stripped:
                raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
            continue
        if cells[-1][0] == "markdown":
            if line and not line.startswith("#"):
                raise ValueError(f"a markdown cell line must start with '#': {line!r}")
            line = line[2:] if line.startswith("# ") else line[1:]
        cells[-1][1].append(line)
    out = []
    for kind, lines, tags in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        out.append((kind, "\n".join(lines), tags))
    return out


def build_notebook(source: Path):
    """An unexecuted ``nbformat`` notebook from a percent-format ``.py`` file."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text, tags in parse_cells(source.read_text()):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell(text)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{source.stem[:2]}-{i:02d}"  # stable ids: rebuilding gives small diffs
    return nb


def is_exercise(cell) -> bool:
    return EXERCISE in cell.get("metadata", {}).get("tags", [])


def kernel_env() -> dict:
    """Environment for the kernel: this one without ``PYTHONPATH``, so that the notebooks import
    only what is installed (``pip install -e ".[notebooks]"``), as they do when a student opens
    them, and never a module that happens to sit in the repository root (``benchmarks``)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def execute(nb, timeout: int = 120):
    """Run every cell of ``nb`` in place with a fresh ``python3`` kernel in ``notebooks/``."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute(env=kernel_env())
    return nb


def hide_exercise_outputs(nb):
    """Drop the outputs of the exercise cells: the reader runs them after predicting."""
    for cell in nb.cells:
        if cell.cell_type == "code" and is_exercise(cell):
            cell.outputs, cell.execution_count = [], None
    return nb


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Build notebooks/*.ipynb from notebooks/src/*.py and execute them.")
    p.add_argument("names", nargs="*", help="notebook name prefixes (default: all), e.g. 01 or 02_sampling")
    p.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    args = p.parse_args(argv)

    import nbformat

    sources = sorted(SRC.glob("[0-9]*.py"))
    if args.names:
        sources = [s for s in sources if any(s.stem.startswith(n) for n in args.names)]
        if not sources:
            raise SystemExit(f"no notebook source in {SRC} starts with {args.names}")
    for source in sources:
        nb = build_notebook(source)
        start = time.perf_counter()
        if not args.no_execute:
            hide_exercise_outputs(execute(nb))
        target = HERE / f"{source.stem}.ipynb"
        nbformat.write(nb, str(target))
        took = f" (executed in {time.perf_counter() - start:.1f} s)" if not args.no_execute else ""
        print(f"wrote {target.relative_to(ROOT)}{took}", file=sys.stderr)


if __name__ == "__main__":
    main()
