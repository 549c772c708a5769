"""Server aggregation strategies behind one interface; `build_strategy` picks one from TrainArgs."""

from __future__ import annotations

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.server.strategy.base import Aggregation, ClientUpdate, Strategy, effective_local
from fedpeft_edge.server.strategy.fedavg import FedAvg
from fedpeft_edge.server.strategy.fedopt import FedAdam, FedYogi
from fedpeft_edge.server.strategy.robust import FedMedian, FedTrimmedAvg

__all__ = ["Aggregation", "ClientUpdate", "Strategy", "effective_local", "FedAvg", "FedAdam", "FedYogi",
           "FedMedian", "FedTrimmedAvg", "build_strategy"]


def build_strategy(train_args: TrainArgs) -> Strategy:
    """The strategy named by train_args.federated_optimizer (FedML's key)."""
    if train_args.federated_optimizer == "FedAvg":
        return FedAvg()
    if train_args.federated_optimizer == "FedMedian":
        return FedMedian()
    if train_args.federated_optimizer == "FedTrimmedAvg":
        return FedTrimmedAvg(train_args.trim_ratio)
    opt = FedAdam if train_args.federated_optimizer == "FedAdam" else FedYogi
    return opt(
        lr=train_args.server_learning_rate,
        beta1=train_args.server_beta1,
        beta2=train_args.server_beta2,
        tau=train_args.server_tau,
    )
