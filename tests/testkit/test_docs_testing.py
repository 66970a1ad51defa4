"""docs/testing.md is executed: every Python block runs, in order, in one namespace, and
each ```text block right after one must match what it printed (``…`` matches anything)."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_a_worked_example() -> None:
    kinds = [k for k, _ in blocks()]
    assert kinds.count("python") >= 8
    assert "explore_crashes" in DOC.read_text()


def test_every_python_block_runs_and_prints_what_the_doc_shows() -> None:
    namespace: dict[str, object] = {"__name__": "docs_testing"}
    found = blocks()
    checked = 0
    for i, (kind, code) in enumerate(found):
        if kind != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{DOC.name} block {i}", "exec"), namespace)
        following = found[i + 1] if i + 1 < len(found) else None
        if following is None or following[0] != "text":
            continue
        printed = out.getvalue().rstrip("\n").splitlines()
        shown = following[1].rstrip("\n").splitlines()
        assert len(printed) == len(shown), (printed, shown)
        for got, want in zip(printed, shown, strict=True):
            pattern = fnmatch.translate(want.replace("[", "[[]").replace("…", "*"))
            assert re.match(pattern, got), f"block {i}:\n  doc: {want}\n  got: {got}"
        checked += 1
    assert checked >= 6
