"""The type stubs (_core.pyi) describe what the extension really exports, and nothing it does not."""

import ast
from pathlib import Path

import sparseinfer
from sparseinfer import _core


def stub_names():
    tree = ast.parse((Path(sparseinfer.__file__).parent / "_core.pyi").read_text())
    top, methods = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        if isinstance(node, ast.AnnAssign):
            top.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            methods[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return top, methods


def test_stubs_match_the_extension():
    top, methods = stub_names()
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert top == public, f"stub only: {top - public}; extension only: {public - top}"
    for cls, names in methods.items():
        for name in names - {"__init__"}:
            assert hasattr(getattr(_core, cls), name), f"{cls}.{name}"
