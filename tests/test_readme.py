"""The README's promises stay true: every test it cites exists, and CI runs its test command."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _test_names(path: pathlib.Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_cited_test_exists():
    cited = re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`", README)
    assert len(cited) > 20, "the README's mapping table should cite the tests"
    for filename, name in cited:
        path = ROOT / "tests" / filename
        assert path.exists(), f"README cites {filename}, which does not exist"
        if name:
            assert name in _test_names(path), f"README cites {filename}::{name}, which does not exist"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci.splitlines(), f"CI must run the README's test command verbatim: {test_cmd!r}"
