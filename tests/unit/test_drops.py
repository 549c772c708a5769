"""One drop vocabulary: every drop site names a DropReason, and a round's drop counter grows in one place."""

from __future__ import annotations

import ast
from pathlib import Path

from fedpeft_edge.drops import DropReason

PKG = Path(__file__).resolve().parents[1].parent / "fedpeft_edge"
_DROP_CALLS = {"AuthError", "_drop", "drop", "dropped", "DroppedMessage", "_device_dropped"}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def test_no_drop_site_names_its_reason_with_a_free_string() -> None:
    found = []
    for path in PKG.rglob("*.py"):
        for call in _calls(ast.parse(path.read_text())):
            if _name(call) not in _DROP_CALLS:
                continue
            args = call.args[1:] if _name(call) in ("AuthError", "_device_dropped") else call.args
            reasons = {r.value for r in DropReason}
            literals = [a.value for a in args if isinstance(a, ast.Constant) and a.value in reasons]
            if literals:
                found.append(f"{path.relative_to(PKG.parent)}:{call.lineno} {literals}")
    assert not found, f"drop reasons as strings (use fedpeft_edge.drops.DropReason): {found}"


def test_a_rounds_drop_counter_grows_in_one_place() -> None:
    places = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AugAssign) and "dropped[" in ast.unparse(node.target):
                places.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert places == [f"fedpeft_edge/server/rounds.py:{_drop_line()}"], places


def _drop_line() -> int:
    src = (PKG / "server" / "rounds.py").read_text()
    return next(i for i, line in enumerate(src.splitlines(), 1) if "self.dropped[" in line and "+= 1" in line)


def test_reasons_are_unique_strings_records_keep() -> None:
    values = [r.value for r in DropReason]
    assert len(values) == len(set(values))
    assert f"{DropReason.NO_UPDATE}" == "no_update_by_deadline" and DropReason("went_offline") is DropReason.OFFLINE
