"""Every teaching notebook runs from top to bottom, and the cells that make a claim back it up.

Each notebook in ``notebooks/`` is executed in memory with ``nbclient`` (a fresh ``python3``
kernel of this interpreter, working directory ``notebooks/``); the committed ``.ipynb`` file is
never rewritten.  A cell that raises fails the test with the cell's traceback.  On top of
that each notebook must print the marker lines its checks print (the checks are ``assert``
statements inside the notebook), and must draw its plots as PNG images.

Two more checks keep the committed files honest: each ``.ipynb`` holds exactly the cells of
its source ``notebooks/src/<name>.py`` (rebuild with ``python notebooks/_build.py``), and was
committed with its outputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

#: notebook -> (lines its output must contain, minimum number of PNG images)
EXPECTED = {
    "01_kv_cache_from_scratch": ([
        "cached == uncached:           True",
        "cached == causal attention:   True",
        "dynamic cache: greedy tokens identical: True",
        "static  cache: greedy tokens identical: True",
        "EQUIVALENCE CHECK PASSED",
    ], 1),
    "02_sampling": ([
        "SAMPLING CHECK PASSED",
        "same seed, same tokens: True",
    ], 5),
    "03_encoder_decoder_cross_attention": ([
        "same tokens: True",
        "PROJECTION COUNTS CHECK PASSED",
        "EQUIVALENCE CHECK PASSED",
    ], 0),
    "04_long_context_caches": ([
        "LinearKVCache ends with the 12 most important tokens: True",
        "sliding window cache == uncached windowed model: True",
        "LONG CONTEXT CHECKS PASSED",
    ], 3),
    "05_speculative_decoding": ([
        "identical to target.generate: True",
        "identical to looper.generate: True",
    ], 2),
    "06_paged_memory_manager": ([
        "PREFIX SHARING CHECK PASSED",
        "EVICTION CHECK PASSED",
        "same tokens: True",
        "PAGED GENERATION CHECK PASSED",
        "PAGING SAVES MEMORY: True",
    ], 7),
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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_matches_its_source_and_has_outputs(name):
    build = _load_build_module()
    committed = nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)
    fresh = build.build_notebook(NOTEBOOKS / "src" / f"{name}.py")
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], (
        f"notebooks/{name}.ipynb is out of date with notebooks/src/{name}.py; run python notebooks/_build.py {name}")
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}.ipynb was committed without running it"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes_and_its_checks_pass(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    on_disk = path.read_bytes()
    nb = nbformat.reads(on_disk.decode("utf-8"), as_version=4)
    # One extra cell, in the in-memory copy only: which interpreter did the kernel run?
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL-EXECUTABLE', sys.executable)"))
    env = dict(os.environ)
    root = str(NOTEBOOKS.parent)  # so `import transformer` works without `pip install -e .`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if any cell fails

    text, images = _outputs(nb)
    lines, min_images = EXPECTED[name]
    for line in lines:
        assert line in text, f"{name}: expected the output to contain {line!r}"
    assert images >= min_images, f"{name}: expected at least {min_images} PNG plots, found {images}"
    kernel_python = text.split("KERNEL-EXECUTABLE ", 1)[1].split("\n", 1)[0].strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
    assert path.read_bytes() == on_disk, f"executing {name} must not rewrite the committed notebook"
