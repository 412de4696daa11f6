"""The README and docs/ keep their promises.

The README is a front door (short: at most 200 lines); the methods and long tables live in
docs/*.md behind it. For all of these pages: every test they cite exists, every relative link
points to a file (and heading) that exists, and CI runs the README's test command verbatim.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README_PATH] + DOCS
MAX_README_LINES = 200

# `tests/test_x.py::name` or `test_x.py` inside backticks (the mapping tables leave out "tests/").
CITATION = re.compile(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`")
# [text](target); images ![alt](target) match too.  Fenced code is removed before matching.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _test_names(path: pathlib.Path) -> set:
    """Functions defined in a test file, plus those it collects with ``from sibling import *``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "*" for a in node.names):
            sibling = path.parent / f"{node.module}.py"
            if sibling.exists():
                names |= _test_names(sibling)
    return names


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    """Every anchor GitHub gives the headings of a Markdown file (repeats get -1, -2, ...)."""
    seen: dict = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_docs_exist_and_readme_is_a_front_door():
    assert DOCS, "docs/*.md should hold the methods and the long tables"
    n = len(README.splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines, more than {MAX_README_LINES}: it is a front door; move methods and "
        f"long tables to a page in docs/ and link to it")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_cited_test_exists(page):
    cited = CITATION.findall(page.read_text(encoding="utf-8"))
    for filename, name in cited:
        path = ROOT / "tests" / filename
        assert path.exists(), f"{_rel(page)} cites {filename}, which does not exist"
        if name:
            assert name in _test_names(path), f"{_rel(page)} cites {filename}::{name}, which does not exist"


def test_the_mapping_tables_cite_tests():
    cited = [c for page in PAGES for c in CITATION.findall(page.read_text(encoding="utf-8"))]
    assert len(cited) > 20, "the reference-system mapping tables should cite the tests behind each name"


# `kv_cache/basic/static.py`, `transformer/model.py`, `kv_cache/paged/`: a repository path in backticks.
CODE_PATH = re.compile(r"`((?:kv_cache|transformer|spec_decoding|benchmarks|examples|notebooks)/[\w/.-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_code_path_named_in_backticks_exists(page):
    """A file that moves (``kv_cache`` is grouped in subpackages) must not leave a stale path behind."""
    for path in CODE_PATH.findall(page.read_text(encoding="utf-8")):
        assert (ROOT / path).exists(), f"{_rel(page)} names `{path}`, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_points_to_something_that_exists(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        assert path.exists(), f"{_rel(page)} links to {target!r}: {path_part!r} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), (
                f"{_rel(page)} links to {target!r}: {_rel(path)} has no heading with anchor {anchor!r} "
                f"(it has {sorted(_anchors(path))})")


def _bash_blocks(text: str) -> list:
    return re.findall(r"```bash\n(.+?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in _bash_blocks(README) if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci.splitlines(), f"CI must run the README's test command verbatim: {test_cmd!r}"


def test_docs_quote_the_readmes_two_commands_verbatim():
    """A page that repeats the main-job or test command repeats it exactly."""
    commands = [c for c in _bash_blocks(README) if c.startswith("pip install torch==")]
    assert len(commands) == 2, f"the README should show the main-job and the test command, found {commands}"
    for page in DOCS:
        for block in _bash_blocks(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                if line.startswith("pip install torch=="):
                    assert line in commands, f"{_rel(page)} quotes {line!r}, which is not the README's command"
