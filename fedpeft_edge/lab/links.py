"""Which link each lab device gets (named profiles, seeded fractions) and when each outage is due."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedpeft_edge.config import LabArgs, LinkProfile, OutageArgs, load_link_profile
from fedpeft_edge.errors import ConfigError

LINKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "links"


def device_ids(n: int) -> list[str]:
    """The lab's device ids, d0 .. d{n-1} (client index i for device d{i})."""
    return [f"d{i}" for i in range(n)]


def resolve_link(spec: str, links_dir: str | Path | None = None) -> LinkProfile:
    """A profile name (a file `<name>.yaml` in links_dir) or a path to a profile YAML file."""
    base = Path(links_dir) if links_dir else LINKS_DIR
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return load_link_profile(path)
    named = base / f"{spec}.yaml"
    if named.exists():
        return load_link_profile(named)
    known = sorted(p.stem for p in base.glob("*.yaml")) if base.is_dir() else []
    raise ConfigError(f"link profile {spec!r} not found in {base} (known: {', '.join(known) or 'none'}); "
                      "name one of those or pass a path to a profile YAML file")


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Devices per share: largest remainder rounding, so counts sum to n and each is within 1 of n * share."""
    exact = [n * f for f in fractions]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_links(lab: LabArgs, profiles: Mapping[str, LinkProfile]) -> dict[str, LinkProfile]:
    """Device id -> profile: explicit `assignment` first; the rest by seeded fractions or round robin."""
    ids = device_ids(lab.devices)
    free = [d for d in ids if d not in lab.assignment]
    if lab.fractions is None:
        names = [lab.links[i % len(lab.links)] for i in range(len(free))]
    else:
        counts = split_counts(len(free), lab.fractions)
        names = [name for name, c in zip(lab.links, counts, strict=True) for _ in range(c)]
        random.Random(lab.seed).shuffle(names)
    out = {d: profiles[lab.assignment[d]] for d in ids if d in lab.assignment}
    out.update({d: profiles[name] for d, name in zip(free, names, strict=True)})
    return {d: out[d] for d in ids}


def load_profiles(lab: LabArgs, links_override: str | None = None) -> dict[str, LinkProfile]:
    """Every profile the lab names, resolved once; `links_override` (a file) puts every device on one link."""
    if links_override and Path(links_override).is_file():
        prof = load_link_profile(links_override)
        return {name: prof for name in {*lab.links, *lab.assignment.values()}}
    links_dir = links_override or lab.links_dir
    return {name: resolve_link(name, links_dir) for name in {*lab.links, *lab.assignment.values()}}


@dataclasses.dataclass
class OutageSchedule:
    """Outages not yet started; `due()` hands out those whose time has come, each once."""

    pending: list[OutageArgs]

    @classmethod
    def of(cls, lab: LabArgs) -> OutageSchedule:
        return cls(list(lab.outages))

    def due(self, now: float, started_at: float, round_opened: Mapping[int, float]) -> list[OutageArgs]:
        """Outages to start now, given when the lab started and when each round opened (time.time())."""
        out = []
        for o in list(self.pending):
            if o.at_round is None:
                start = started_at + o.after_s
            elif o.at_round in round_opened:
                start = round_opened[o.at_round] + o.after_s
            else:
                continue
            if now >= start:
                out.append(o)
                self.pending.remove(o)
        return out
