"""Every teaching notebook runs from top to bottom, and the cells that make a claim back it up.

Each notebook in ``notebooks/`` is executed in memory with ``nbclient`` (a fresh ``python3``
kernel of this interpreter, working directory ``notebooks/``); the committed ``.ipynb`` file is
never rewritten.  The kernel sees what a student's kernel sees after
``pip install -e ".[notebooks]" && jupyter lab notebooks/``: the installed packages and nothing
else -- ``PYTHONPATH`` is removed, and a check cell asserts that the repository root is not on
the kernel's ``sys.path`` (so ``import benchmarks`` fails there).  A cell that raises fails the
test with the cell's traceback.  On top of that each notebook must print the marker lines its
checks print (the checks are ``assert`` statements inside the notebook), and must draw its plots
as PNG images.

More checks keep the committed files honest: each ``.ipynb`` holds exactly the cells of its
source ``notebooks/src/<name>.py`` (rebuild with ``python notebooks/_build.py``), was committed
with its outputs -- except its two or three "predict, then run" exercise cells, which are saved
without outputs and followed by a folded answer -- and every module the notebooks import comes
with the core dependencies or the ``notebooks`` extra of ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

#: notebook -> (lines its output must contain, minimum number of PNG images)
EXPECTED = {
    "01_kv_cache_from_scratch": ([
        "K, V (out of update)  (1, 4, 11, 8)",
        "cached == uncached:           True",
        "cached == causal attention:   True",
        "token 12: uncached 78 scores and 12 key/value projections, cached 12 scores and 1 key/value projection",
        "dynamic cache: greedy tokens identical: True",
        "static  cache: greedy tokens identical: True",
        "EQUIVALENCE CHECK PASSED",
    ], 2),
    "02_sampling": ([
        "SAMPLING CHECK PASSED",
        "same seed, same tokens: True",
    ], 6),
    "03_encoder_decoder_cross_attention": ([
        "same tokens: True",
        "PROJECTION COUNTS CHECK PASSED",
        "symbol-writing steps look hardest at the mirrored source position",
        "EQUIVALENCE CHECK PASSED",
    ], 2),
    "04_long_context_caches": ([
        "LinearKVCache ends with the 12 most important tokens: True",
        "sliding window cache == uncached windowed model: True",
        "LONG CONTEXT CHECKS PASSED",
    ], 3),
    "05_speculative_decoding": ([
        "5 tokens in one pass cost",
        "identical to target.generate: True",
        "identical to looper.generate: True",
    ], 3),
    "06_paged_memory_manager": ([
        "PREFIX SHARING CHECK PASSED",
        "EVICTION CHECK PASSED",
        "same tokens: True",
        "PAGED GENERATION CHECK PASSED",
        "standard error of one interval's hit rate",
        "PAGING SAVES MEMORY: True",
    ], 7),
    "07_continuous_batching": ([
        "continuous batching: 24 steps, every request got its reference tokens",
        "preempted request's output == model.generate alone: True",
        "prefix_hit_tokens: 16 of 21 prompt tokens",
        "both answers == model.generate alone: True",
        "admitted in the same step: prefix_hit_tokens = 0",
        "CONTINUOUS BATCHING CHECK PASSED",
    ], 6),
}


def _load_build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(nb):
    """All printed text of ``nb`` and the number of PNG images it displays."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out:
                images += "image/png" in out["data"]
                text.append(out["data"].get("text/plain", ""))
    return "".join(text), images


def test_every_notebook_is_checked():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb")) == sorted(EXPECTED)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_notebooks_import_only_the_core_dependencies_and_the_notebooks_extra():
    """`pip install -e ".[notebooks]"` is all a student installs: every top-level module a
    notebook imports must be the standard library, one of the project's packages, or provided by
    a distribution named in ``dependencies`` or the ``notebooks`` extra (not merely by something
    that happens to be installed here, like the test extra's packages or ``benchmarks/``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["notebooks"]
    assert "jupyter" in {_requirement_name(r) for r in extra}, "the notebooks extra must bring Jupyter"
    allowed = {_requirement_name(r) for r in project["project"]["dependencies"] + extra}
    own = {name for name in project["tool"]["setuptools"]["packages"]["find"]["include"] if "*" not in name}
    providers = importlib.metadata.packages_distributions()
    imported = set()
    for source in sorted((NOTEBOOKS / "src").glob("[0-9]*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                imported |= {(source.stem, a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add((source.stem, node.module.split(".")[0]))
    assert {"torch", "matplotlib"} <= {module for _, module in imported}  # the scan sees the imports
    for name, module in sorted(imported):
        if module in sys.stdlib_module_names or module in own:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists & allowed, (f"notebooks/src/{name}.py imports {module!r} (from {sorted(dists) or 'nowhere'}), "
                                 f"which neither the dependencies nor the notebooks extra provide: {sorted(allowed)}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_matches_its_source_and_has_outputs(name):
    build = _load_build_module()
    committed = nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)
    fresh = build.build_notebook(NOTEBOOKS / "src" / f"{name}.py")
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], (
        f"notebooks/{name}.ipynb is out of date with notebooks/src/{name}.py; run python notebooks/_build.py {name}")
    assert [c.metadata.get("tags", []) for c in committed.cells] == [c.metadata.get("tags", []) for c in fresh.cells]
    code = [c for c in committed.cells if c.cell_type == "code" and not build.is_exercise(c)]
    assert all(c.execution_count is not None for c in code), f"{name}.ipynb was committed without running it"

    # The notebook ends with 2 or 3 "predict, then run" exercises: their outputs are not given
    # away, and each is followed by its answer, folded.
    cells = committed.cells
    exercises = [i for i, c in enumerate(cells) if c.cell_type == "code" and build.is_exercise(c)]
    assert 2 <= len(exercises) <= 3, f"{name}: expected 2 or 3 exercise cells, found {len(exercises)}"
    assert exercises[0] > len(cells) // 2, f"{name}: the exercises belong at the end"
    for i in exercises:
        assert not cells[i].outputs and cells[i].execution_count is None, f"{name}: exercise cell {i} shows its output"
        answer = cells[i + 1] if i + 1 < len(cells) else None
        assert answer is not None and answer.cell_type == "markdown" and "<details>" in answer.source, (
            f"{name}: exercise cell {i} must be followed by a markdown answer inside <details>")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes_and_its_checks_pass(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    on_disk = path.read_bytes()
    nb = nbformat.reads(on_disk.decode("utf-8"), as_version=4)
    # One extra cell, in the in-memory copy only: which interpreter did the kernel run, what could
    # it import, and from where?  (At the end: a notebook that edits sys.path is caught too.)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import importlib.util, json, os, sys\n"
        "print('KERNEL-EXECUTABLE', sys.executable)\n"
        "print('KERNEL-CWD', os.getcwd())\n"
        "print('KERNEL-SYS-PATH', json.dumps([os.path.realpath(p or '.') for p in sys.path]))\n"
        "print('KERNEL-FINDS-BENCHMARKS', importlib.util.find_spec('benchmarks') is not None)"))
    # Only what is installed: no PYTHONPATH (the test process may have the repository root on its
    # own sys.path, but that is not inherited through the environment).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    client = NotebookClient(nb, timeout=120, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if any cell fails

    text, images = _outputs(nb)
    lines, min_images = EXPECTED[name]
    for line in lines:
        assert line in text, f"{name}: expected the output to contain {line!r}"
    assert images >= min_images, f"{name}: expected at least {min_images} PNG plots, found {images}"
    def reported(key):
        return text.split(f"{key} ", 1)[1].split("\n", 1)[0].strip()

    assert os.path.realpath(reported("KERNEL-EXECUTABLE")) == os.path.realpath(sys.executable)
    assert os.path.realpath(reported("KERNEL-CWD")) == os.path.realpath(NOTEBOOKS)
    assert os.path.realpath(ROOT) not in json.loads(reported("KERNEL-SYS-PATH")), (
        f"{name}: the repository root is on the kernel's sys.path, so the notebook could import modules "
        f"that `pip install .` does not install; it must run with the installed packages only")
    assert reported("KERNEL-FINDS-BENCHMARKS") == "False", (
        f"{name}: the kernel can import `benchmarks`, which is not an installed package (an editable install in "
        f"'compat' mode puts the repository root on sys.path; use the default mode)")
    assert path.read_bytes() == on_disk, f"executing {name} must not rewrite the committed notebook"
