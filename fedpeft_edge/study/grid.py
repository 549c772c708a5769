"""A study's grid expanded into runs: deterministic order, stable run ids, one resolved config per run.

Order: the grid's axes in the order the study file writes them, the first axis varying slowest (as
`itertools.product`), values in the order given. Precedence of settings, lowest first: the base config, the
study's `overrides`, `per_method[<method>]`, the grid's values. A per-method override of a key the grid
sweeps is an error (the sweep would silently lose). Run ids are `<axis>-<value>` parts joined by "_", the
axis named by a short alias of its last key component (`learning_rate` -> `lr`, `random_seed` -> `seed`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft_edge.config import PeftArgs, RunConfig, StudyConfig, config_from_dict, config_to_dict, load_config
from fedpeft_edge.errors import ConfigError

METHOD_KEY = "peft_args.method"
SEED_KEY = "common_args.random_seed"
# Settings that do not change what a run computes: left out of its config hash (the MQTT executor picks a
# free broker port, the study places the run directory and the devices' state directory).
VOLATILE_KEYS = ("common_args.run_id", "tracking_args.run_dir", "tracking_args.log_level",
                 "comm_args.broker_host", "comm_args.broker_port", "device_args.state_dir")
_ALIASES = {"learning_rate": "lr", "random_seed": "seed", "partition_alpha": "alpha",
            "partition_method": "partition", "client_num_per_round": "per_round", "target_epsilon": "eps",
            "encoding": "enc", "client_num_in_total": "devices", "comm_round": "rounds"}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: its settings are dicts
class Axis:
    """One grid axis: a dotted config key with values, or a named bundle {label: {dotted key: value}}."""

    name: str
    labels: tuple[str, ...]
    settings: tuple[Mapping[str, Any], ...]  # per label, the dotted keys it sets

    @property
    def keys(self) -> set[str]:
        return {k for s in self.settings for k in s}


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its id, the grid values that make it, and its resolved config."""

    index: int
    run_id: str
    assignment: tuple[tuple[str, str], ...]  # (axis name, value label), in grid order
    overrides: Mapping[str, Any]  # every dotted key applied to the base config, in precedence order
    config: RunConfig
    config_hash: str

    @property
    def values(self) -> dict[str, str]:
        return dict(self.assignment)

    @property
    def method(self) -> str:
        return self.config.peft_args.method


def expand_study(study: StudyConfig, runs_dir: str | Path | None = None) -> list[PlannedRun]:
    """All runs of a study, in grid order, excluded runs left out; ConfigError names a bad key or value."""
    base = config_to_dict(load_config(study.base_config))
    axes = [_axis(name, values, study.name) for name, values in study.grid.items()]
    _check_per_method(study, axes)
    short = _short_names(axes)
    runs: list[PlannedRun] = []
    for combo in itertools.product(*(range(len(a.labels)) for a in axes)):
        assignment = tuple((a.name, a.labels[i]) for a, i in zip(axes, combo, strict=True))
        grid_values: dict[str, Any] = {}
        for a, i in zip(axes, combo, strict=True):
            grid_values.update(a.settings[i])
        run_id = "_".join(f"{short[a]}-{label}" for a, (_n, label) in zip(axes, assignment, strict=True))
        run_id = run_id or study.name
        overrides = _overrides_for(study, base, grid_values, run_id)
        where = f"study {study.name!r} run {run_id}"
        cfg = config_from_dict(base, overrides, source=where)
        if _excluded(study.exclude, cfg, assignment, where):
            continue
        runs.append(PlannedRun(index=len(runs), run_id=run_id, assignment=assignment, overrides=overrides,
                               config=cfg, config_hash=config_hash(cfg)))
    _check_unique(runs, study.name)
    if not runs:
        raise ConfigError(f"study {study.name!r} expands to no runs; check its grid and exclude entries")
    return runs


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 hex of the resolved config without VOLATILE_KEYS: equal hashes = the same experiment."""
    data = config_to_dict(cfg)
    for dotted in VOLATILE_KEYS:
        section, _, key = dotted.partition(".")
        data.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def format_value(value: Any) -> str:
    """A grid value as it appears in a run id: 0.01 -> '0.01', 1e-05 -> '1e-05', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    bad = [c for c in text if not (c.isalnum() or c in "._-+")]
    if not text or bad:
        raise ConfigError(f"grid value {value!r} cannot name a run (characters {''.join(bad)!r}); "
                          "use letters, digits, '.', '_', '-' or '+', or a named bundle axis")
    return text


# --- helpers ----------------------------------------------------------------------------------------------


def _axis(name: str, values: Any, study: str) -> Axis:
    where = f"study {study!r} grid axis {name!r}"
    if "." in name:
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}")
        return Axis(name, tuple(format_value(v) for v in values), tuple({name: v} for v in values))
    if not isinstance(values, Mapping) or not values:
        raise ConfigError(f"{where}: a name without a dot is a bundle axis and needs a mapping "
                          f"{{label: {{dotted.key: value}}}}, got {values!r}; or name a dotted config key")
    for label, setting in values.items():
        if not isinstance(setting, Mapping) or not all(isinstance(k, str) and "." in k for k in setting):
            raise ConfigError(f"{where}: label {label!r} must map dotted config keys to values, got {setting!r}")
    return Axis(name, tuple(format_value(lb) for lb in values), tuple(dict(s) for s in values.values()))


def axis_label(name: str) -> str:
    """The short name of a grid axis: its last key component, aliased (`train_args.learning_rate` -> `lr`)."""
    last = name.rsplit(".", 1)[-1]
    return _ALIASES.get(last, last)


def _short_names(axes: Sequence[Axis]) -> dict[Axis, str]:
    short = {a: axis_label(a.name) for a in axes}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {a: s if counts[s] == 1 else a.name.replace(".", "-") for a, s in short.items()}


def _check_per_method(study: StudyConfig, axes: Sequence[Axis]) -> None:
    methods = typing.get_args(typing.get_type_hints(PeftArgs)["method"])
    swept = {k for a in axes for k in a.keys}
    for method, settings in study.per_method.items():
        where = f"study {study.name!r} per_method {method!r}"
        if method not in methods:
            raise ConfigError(f"{where}: unknown method; per_method keys are PEFT methods: {', '.join(methods)}")
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {settings!r}")
        clash = sorted(swept & set(settings))
        if clash:
            raise ConfigError(f"{where} sets {', '.join(clash)}, which the grid sweeps; "
                              "drop it from per_method or from the grid")


def _overrides_for(study: StudyConfig, base: Mapping[str, Any], grid: Mapping[str, Any],
                   run_id: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(study.overrides)
    method = grid.get(METHOD_KEY, out.get(METHOD_KEY, base.get("peft_args", {}).get("method")))
    out.update(study.per_method.get(str(method), {}) or {})
    out.update(grid)
    out["common_args.run_id"] = run_id
    return out


def _excluded(rules: Sequence[Mapping[str, Any]], cfg: RunConfig, assignment: Sequence[tuple[str, str]],
              where: str) -> bool:
    resolved = config_to_dict(cfg)
    labels = dict(assignment)
    return any(all(_matches(key, want, resolved, labels, where) for key, want in rule.items()) for rule in rules)


def _matches(key: str, want: Any, resolved: Mapping[str, Any], labels: Mapping[str, str], where: str) -> bool:
    if "." not in key:
        if key not in labels:
            raise ConfigError(f"{where}: exclude key {key!r} is neither a dotted config key nor a bundle axis")
        return fnmatch.fnmatchcase(labels[key], str(want))
    node: Any = resolved
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{where}: exclude key {key!r} is not a config key ({part!r} unknown)")
        node = node[part]
    if isinstance(want, str) and isinstance(node, str):
        return fnmatch.fnmatchcase(node, want)
    return bool(node == want)


def _check_unique(runs: Sequence[PlannedRun], study: str) -> None:
    seen: dict[str, PlannedRun] = {}
    for r in runs:
        if r.run_id in seen:
            raise ConfigError(f"study {study!r}: two grid points share the run id {r.run_id!r} "
                              "(values that print the same); make the grid values distinct")
        seen[r.run_id] = r
