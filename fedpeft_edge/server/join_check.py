"""Judging a join: what differs between a device and the run (method, class count, manifest, backbone, classes),
named by what differs, with the setting that fixes it."""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.base import Manifest


def join_refusal(*, manifest: Manifest, fingerprint: str, num_classes: int, model_desc: str,
                 class_names: Sequence[str] | None, device_manifest_hash: str, device_manifest: str | None,
                 device_fingerprint: str, device_classes: Sequence[str] | None) -> str | None:
    """Why a device cannot join the run, or None. The manifest is compared before the fingerprint: another PEFT
    method freezes other tensors, so its fingerprint differs too, but the method is what to fix."""
    if device_manifest_hash != manifest.hash:
        theirs = _manifest_or_none(device_manifest)
        if theirs is not None:
            return _manifest_difference(manifest, theirs, num_classes, model_desc,
                                        backbone_differs=device_fingerprint != fingerprint)
        return (f"manifest {device_manifest_hash[:12]} differs from the server's {manifest.hash[:12]} (method "
                f"{manifest.method}): run the agent with the server's peft_args and model_args")
    if device_fingerprint != fingerprint:
        return (f"backbone differs: the device's frozen tensors (fingerprint {device_fingerprint[:12]}) are not the "
                f"server's ({fingerprint[:12]}, {model_desc}): run the agent with the server's model_args (same "
                "model, weights and checkpoint file)")
    return class_refusal(class_names, device_classes)


def class_refusal(run_classes: Sequence[str] | None, device_classes: Sequence[str] | None) -> str | None:
    """A device holding classes the run does not have cannot map its labels by name."""
    if run_classes is None or device_classes is None:
        return None
    unknown = [c for c in device_classes if c not in set(run_classes)]
    if not unknown:
        return None
    return (f"classes differ: the device holds class(es) {unknown[:10]} that are not among the run's "
            f"{len(run_classes)} classes {list(run_classes)[:20]}: rename the device's class folders to the run's "
            "names, remove those folders, or add the classes to the server's data_args.class_names (and "
            "model_args.num_classes)")


def _manifest_or_none(text: str | None) -> Manifest | None:
    if not text:
        return None
    try:
        return Manifest.from_json(text)
    except PeftMethodError:
        return None


def _manifest_difference(mine: Manifest, theirs: Manifest, num_classes: int, model_desc: str,
                         backbone_differs: bool) -> str:
    if theirs.method != mine.method:
        return (f"PEFT method differs: the device trains {theirs.method!r}, the run {mine.method!r}: set "
                f"peft_args.method: {mine.method} on the device (run it with the server's peft_args)")
    own = {t.name: t.shape for t in mine.tensors}
    other = {t.name: t.shape for t in theirs.tensors}
    reshaped = sorted(n for n in own.keys() & other.keys() if own[n] != other[n])
    classes = {other[n][0] for n in reshaped if own[n] and own[n][0] == num_classes and other[n]}
    if reshaped and len(classes) == 1 and own.keys() == other.keys():
        return (f"class count differs: the device's model has {classes.pop()} classes, the run's {num_classes}: set "
                f"model_args.num_classes: {num_classes} on the device")
    missing, extra = sorted(own.keys() - other.keys()), sorted(other.keys() - own.keys())
    detail = "; ".join(part for part in (
        f"{len(missing)} of the run's tensors missing (e.g. {missing[0]})" if missing else "",
        f"{len(extra)} the run lacks (e.g. {extra[0]})" if extra else "",
        f"{len(reshaped)} of another shape (e.g. {reshaped[0]} {list(other[reshaped[0]])} against "
        f"{list(own[reshaped[0]])})" if reshaped else "") if part)
    if backbone_differs:
        return (f"backbone differs: the device builds another model than the run's ({model_desc}): {detail}: run "
                "the agent with the server's model_args")
    return (f"manifest differs (method {mine.method}): {detail or 'same tensors, other dtypes'}: run the agent with "
            f"the server's peft_args (its {mine.method} settings) and model_args")
