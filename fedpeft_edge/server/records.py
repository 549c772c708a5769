"""What the round engine writes about devices and rounds: device_round, round, divergence and summary records
(the record classes are fedpeft_edge/records.py's; this module fills them)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from fedpeft_edge.drops import DropReason
from fedpeft_edge.protocol import DeviceReport
from fedpeft_edge.records import DeviceRoundRecord, DivergenceRecord, R, RoundRecord, RunSummary
from fedpeft_edge.server.ports import RunLogWriter, Traffic

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Accepted:
    """An update taken into the running aggregation, with what the records need about it."""

    device_id: str
    round: int  # the round of the task it answers (async: may be older than the aggregation's)
    report: DeviceReport
    num_samples: int  # as aggregated (capped at the join's declared count)
    declared_samples: int
    received_at: float
    upload_s: float | None
    update_norm: float | None = None
    norm_action: str | None = None  # "clipped" when train_args.max_update_norm scaled it down
    staleness: int | None = None  # async: global versions between the task and this aggregation
    weight: float = 1.0  # async: the staleness weight applied to its delta


class RoundRecords:
    """Writes device_round and round records with the metered traffic of each device and round."""

    def __init__(self, runlog: RunLogWriter, traffic: Traffic, mode: str, bytes_kind: str = "wire") -> None:
        self.runlog = runlog
        self.traffic = traffic
        self.mode = mode
        self.bytes_kind = bytes_kind  # "wire": MQTT packets metered at the socket; "encoded": frames in memory
        self.cum_bytes = 0

    def device(
        self, round_idx: int, retry: int, opened_at: float, device_id: str, status: str,
        reason: DropReason | None, *, report: DeviceReport | None = None, acc: Accepted | None = None,
        traffic_round: int | None = None, detail: str | None = None, **extra: Any,
    ) -> None:
        """`reason` and `detail` make the record's drop_reason: "<reason>" or "<reason>: <detail>"."""
        rep = acc.report if acc is not None else (report or DeviceReport())
        fields = rep.record_fields()
        t = self.traffic.device(traffic_round if traffic_round is not None else round_idx, device_id)
        download_s = fields.pop("download_s")
        rec = DeviceRoundRecord(
            round=round_idx, attempt=retry, device_id=device_id, status=status,
            drop_reason=_drop_reason(reason, detail), num_samples=acc.num_samples if acc else None,
            declared_samples=acc.declared_samples if acc else None,
            bytes_down=t.bytes_down, bytes_up=t.bytes_up, msgs_down=t.msgs_down, msgs_up=t.msgs_up,
            download_s=download_s if download_s is not None else t.download_s,
            upload_s=acc.upload_s if acc else None, **fields,
            response_s=(acc.received_at - opened_at) if acc else None,
            update_norm=acc.update_norm if acc else None, norm_action=acc.norm_action if acc else None,
            staleness=acc.staleness if acc else None,
            staleness_weight=acc.weight if acc and acc.staleness is not None else None,
            bytes_kind=self.bytes_kind,
        )
        self.runlog.append(_with(rec, extra))

    def round(self, round_idx: int, retry: int, ok: bool, selected: Iterable[str], accepted: int,
              dropped: dict[str, int], round_s: float, aggregate_s: float, eval_res: dict[str, Any] | None,
              devices_online: int, **extra: Any) -> None:
        down, up = self.traffic.round_bytes(round_idx)
        self.cum_bytes += down + up
        self.runlog.append(_with(RoundRecord(
            round=round_idx, attempt=retry, status="aggregated" if ok else "failed",
            selected=list(selected), accepted=accepted if ok else 0, dropped=dropped, bytes_down=down,
            bytes_up=up, cum_bytes=self.cum_bytes, round_s=round_s, aggregate_s=aggregate_s, eval=eval_res,
            devices_online=devices_online, mode=self.mode, bytes_kind=self.bytes_kind,
        ), extra))


def _with(rec: R, extra: Mapping[str, Any]) -> R:
    """The record with `extra` keyword fields set: its own fields by name, the rest kept in `extra`."""
    if not extra:
        return rec
    own = set(rec.field_names())
    return dataclasses.replace(rec, **{k: v for k, v in extra.items() if k in own},
                               extra={**rec.extra, **{k: v for k, v in extra.items() if k not in own}})


def _drop_reason(reason: DropReason | None, detail: str | None) -> str | None:
    if reason is None:
        return None
    return f"{reason.value}: {detail}" if detail else reason.value


class DivergenceWatch:
    """Flags a learning rate that is too high: a device's train loss non-finite, or where its local training
    ENDED (`train_loss_end`, the last quarter of its steps) above chance (ln C) in two consecutive rounds it
    trained; or the global model at chance: its top-1 falling back to chance after having been above it, or its
    evaluation loss within 10% of chance (>= 0.9 ln C) in two consecutive evaluated rounds.

    Neither the epoch's mean loss nor one round is enough: on a skewed shard a healthy device starts each
    round from a global model that mispredicts its classes, so its mean loss sits above ln C round after round
    while its loss falls within the round (measured: head at lr 0.01 on Fashion-MNIST at alpha 0.1, mean
    3.8-5.5 in rounds 2-3, flagged before; at alpha 0.5, round 1, 3.6-6.2). A rate that is too high keeps the
    END of training above chance too. Devices that do not report `train_loss_end` are judged on the mean.

    A rate too high can also wreck the shared tensors with no device ending above chance: bias at lr 0.03 on
    Fashion-MNIST at alpha 0.5 (EfficientNet-Lite0) ends its devices' training at 1.2-2.3 but evaluates at loss
    2.28, 2.21, 2.12 (ln 10 = 2.30; top-1 18%, 15%, 22%), where lr 0.003 evaluates at 1.11, 0.81, 0.73. The
    zero-initialised head starts every run AT ln C, so the loss rule waits for two evaluated rounds.
    """

    EVAL_LOSS_FRACTION = 0.9  # of ln C: "at chance" for the global model's evaluation loss

    def __init__(self, runlog: RunLogWriter, num_classes: int, learning_rate: float) -> None:
        self.runlog = runlog
        self.chance_loss = math.log(num_classes) if num_classes > 1 else math.inf
        self.chance_top1 = 1.0 / num_classes + 0.02
        self.chance_eval_loss = self.EVAL_LOSS_FRACTION * self.chance_loss
        self.lr = learning_rate
        self._was_above = False
        self._eval_at_chance = False  # the last evaluated round's loss was at chance
        self._above: dict[str, bool] = {}  # device -> its last reported train loss was above chance

    def _flag(self, round_idx: int, device_id: str | None, what: str, value: Any,
              threshold: float | None = None) -> None:
        hint = f"learning rate train_args.learning_rate={self.lr:g} is the likely cause; lower it"
        who = f"device {device_id}" if device_id else "the global model"
        log.warning("round %d: %s diverges (%s = %s): %s", round_idx, who, what, value, hint)
        self.runlog.append(DivergenceRecord(round=round_idx, device_id=device_id, metric=what, value=value,
                                            threshold=threshold if threshold is not None else self.chance_loss,
                                            hint=hint))

    def device(self, round_idx: int, device_id: str, report: DeviceReport) -> None:
        name = "train_loss" if report.train_loss_end is None else "train_loss_end"
        loss = report.train_loss if report.train_loss_end is None else report.train_loss_end
        if {"train_loss", "train_loss_end"} & set(report.nonfinite) or (loss is not None and not math.isfinite(loss)):
            self._flag(round_idx, device_id, name, "non-finite")
        elif loss is not None:
            above = loss > self.chance_loss
            if above and self._above.get(device_id):
                self._flag(round_idx, device_id, name, loss)
            self._above[device_id] = above

    def global_eval(self, round_idx: int, eval_res: dict[str, Any] | None) -> None:
        res = eval_res or {}
        top1, loss = res.get("top1"), res.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            if not math.isfinite(loss):
                self._flag(round_idx, None, "eval_loss", "non-finite")
                self._eval_at_chance = True
            else:
                if loss >= self.chance_eval_loss and self._eval_at_chance:
                    self._flag(round_idx, None, "eval_loss", loss, self.chance_eval_loss)
                self._eval_at_chance = loss >= self.chance_eval_loss
        if not isinstance(top1, (int, float)):
            return
        if top1 > self.chance_top1:
            self._was_above = True
        elif self._was_above:
            self._flag(round_idx, None, "top1", top1, self.chance_top1)
            self._was_above = False


def build_summary(rounds: list[RoundRecord], shared_params: int, fingerprint: str) -> RunSummary:
    """summary.json: final accuracy, bytes per direction and per round, from the round records themselves."""
    ok = [r for r in rounds if r.aggregated]  # failed attempts' bytes crossed the wire too
    evals = [r.eval["top1"] for r in ok if r.eval]
    ppl = [(r.eval or {})["perplexity"] for r in ok if (r.eval or {}).get("perplexity") is not None]
    down = sum(r.bytes_down or 0 for r in rounds)
    up = sum(r.bytes_up or 0 for r in rounds)
    drops: dict[str, int] = {}
    for r in rounds:
        for reason, n in (r.dropped or {}).items():
            drops[reason] = drops.get(reason, 0) + int(n)
    return RunSummary(
        rounds=len(ok),
        final_top1=evals[-1] if evals else None,
        best_top1=max(evals) if evals else None,
        final_perplexity=ppl[-1] if ppl else None,  # causal LMs
        best_perplexity=min(ppl) if ppl else None,
        bytes_down=down,
        bytes_up=up,
        bytes_total=down + up,
        bytes_per_round=(down + up) / len(ok) if ok else None,
        shared_params=shared_params,
        backbone_fingerprint=fingerprint,
        dropped=drops,
    )
