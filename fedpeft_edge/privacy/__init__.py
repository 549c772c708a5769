"""Differential privacy on the device: DP-SGD via opacus (dp.py) and the per-device ledger (ledger.py)."""

from fedpeft_edge.privacy.dp import DpPlan, DpPrivatizer, build_privatizer, plan_dp
from fedpeft_edge.privacy.ledger import LEDGER_FILENAME, PrivacyLedger, ledger_path_for

__all__ = [
    "LEDGER_FILENAME",
    "DpPlan",
    "DpPrivatizer",
    "PrivacyLedger",
    "build_privatizer",
    "ledger_path_for",
    "plan_dp",
]
