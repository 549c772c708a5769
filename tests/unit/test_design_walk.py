"""docs/design.md's opening walk (one PEFT tensor through a round) is true to the code: every `file.py:Name`
it cites is a module of the package that defines that function, class or method."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITE = re.compile(r"`([\w/]+\.py):([\w.]+)`")


def _walk() -> str:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return text.split("\n## ", 2)[1]  # the first section: the walk


def _defines(tree: ast.Module, qualname: str) -> bool:
    scope: list[ast.stmt] = tree.body
    for part in qualname.split("."):
        found = next((n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.name == part), None)
        if found is None:
            return False
        scope = found.body
    return True


def test_the_walk_cites_enough_to_follow_a_tensor() -> None:
    cites = CITE.findall(_walk())
    assert len(cites) >= 30
    files = {f for f, _ in cites}
    for needed in ("server/engine.py", "client/logic.py", "training.py", "server/admission.py",
                   "server/strategy/base.py", "wire/codec.py", "transport/mqtt.py"):
        assert needed in files


def test_every_name_the_walk_cites_exists() -> None:
    missing = []
    for rel, qualname in CITE.findall(_walk()):
        path = ROOT / "fedpeft_edge" / rel
        if not path.is_file() or not _defines(ast.parse(path.read_text(encoding="utf-8")), qualname):
            missing.append(f"{rel}:{qualname}")
    assert missing == []


def test_the_checker_sees_a_wrong_name() -> None:
    tree = ast.parse("class A:\n    def f(self): ...\ndef g(): ...\n")
    assert _defines(tree, "A.f") and _defines(tree, "g")
    assert not _defines(tree, "A.g") and not _defines(tree, "B")
