"""The round engine is one core and two round policies: every round_mode has a policy, and nothing in server/
branches on the mode (it is read once, where the engine picks its policy)."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.server.engine import POLICIES
from fedpeft_edge.server.round_policy import RoundPolicy

SERVER = Path(__file__).resolve().parents[3] / "fedpeft_edge" / "server"
MODES = {"sync", "async"}


def _mode_branches(source: str) -> list[str]:
    """Comparisons with a round mode's name, or with anything called `mode` / `round_mode`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        parts = [node.left, *node.comparators]
        named = any(isinstance(p, ast.Constant) and p.value in MODES for p in parts)
        moded = any(isinstance(p, (ast.Name, ast.Attribute)) and (getattr(p, "id", None) or getattr(p, "attr", ""))
                    in ("mode", "round_mode") for p in parts)
        if named or moded:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_every_round_mode_has_a_policy() -> None:
    field = {f.name: f for f in dataclasses.fields(TrainArgs)}["round_mode"]
    modes = set(typing.get_args(typing.get_type_hints(TrainArgs)[field.name]))
    assert modes == MODES == set(POLICIES)
    assert all(issubclass(p, RoundPolicy) and p.name == mode for mode, p in POLICIES.items())


def test_the_mode_finder_finds_a_branch() -> None:
    assert _mode_branches('if self.args.round_mode == "async":\n    pass\n')
    assert _mode_branches('x = a if mode != "sync" else b\n')
    assert not _mode_branches('POLICIES = {"sync": 1, "async": 2}\n')


def test_no_mode_branch_in_server() -> None:
    branches = {p.name: b for p in sorted(SERVER.rglob("*.py")) if (b := _mode_branches(p.read_text()))}
    assert branches == {}
