"""The package never deserialises with pickle or marshal, never calls yaml.load without a
safe loader, and never evals or execs: a scan of every source file's code (comments and
strings left out, so docstrings that say "never pickle" do not count)."""

from __future__ import annotations

import ast
import tokenize
from pathlib import Path

import sagaway

PACKAGE = Path(sagaway.__file__).parent
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
BANNED_CALLS = {"eval", "exec"}


def sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40, "the scan found too few files to mean anything"
    return files


def code_tokens(path: Path) -> str:
    """The file's code with comments and string literals removed."""
    out = []
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING):
                out.append(tok.string)
    return " ".join(out)


def problems(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in BANNED_MODULES:
            found.append(f"from {node.module} import …")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else (
                fn.attr if isinstance(fn, ast.Attribute) else None)
            if name in BANNED_CALLS:
                found.append(f"{name}(…) at line {node.lineno}")
            if name in ("__import__", "import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] \
                    in BANNED_MODULES:
                found.append(f"dynamic import of {node.args[0].value}")
            if isinstance(fn, ast.Attribute) and fn.attr in ("load", "load_all") \
                    and isinstance(fn.value, ast.Name) and fn.value.id == "yaml":
                loader = {k.arg: k.value for k in node.keywords}.get("Loader")
                safe = isinstance(loader, ast.Attribute) and loader.attr in (
                    "SafeLoader", "CSafeLoader")
                if not safe:
                    found.append(f"yaml.{fn.attr} without SafeLoader at line {node.lineno}")
            if isinstance(fn, ast.Attribute) and fn.attr == "unsafe_load":
                found.append(f"unsafe_load at line {node.lineno}")
    text = code_tokens(path)
    for word in ("pickle", "marshal", "unsafe_load"):
        if word in text.split():
            found.append(f"the name {word!r} in code")
    return found


def test_no_unsafe_deserialisation_or_eval_in_the_package() -> None:
    report = {str(p.relative_to(PACKAGE)): problems(p) for p in sources()}
    assert {k: v for k, v in report.items() if v} == {}


def test_the_scan_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom marshal import loads\nimport yaml\n"
        "yaml.load(s)\nyaml.load(s, Loader=yaml.FullLoader)\n"
        "yaml.load(s, Loader=yaml.SafeLoader)\neval('1')\nexec('x=1')\n"
        "__import__('pickle')\n# pickle in a comment is fine\nx = 'pickle in a string'\n"
    )
    found = problems(bad)
    assert "import pickle" in found and "from marshal import …" in found
    assert sum("yaml.load without SafeLoader" in f for f in found) == 2
    assert any(f.startswith("eval(") for f in found)
    assert any(f.startswith("exec(") for f in found)
    assert "dynamic import of pickle" in found
