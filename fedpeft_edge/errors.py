"""The project's exception tree: every error a user can cause names the value and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedpeft_edge.drops import DropReason


class FedPeftError(Exception):
    """Base of every error fedpeft-edge raises on purpose."""


class ConfigError(FedPeftError):
    """A configuration file, key or value is wrong."""


class BackboneError(FedPeftError):
    """A backbone cannot be built or its weights cannot be loaded."""


class PeftMethodError(FedPeftError):
    """A PEFT method cannot be applied, or a state does not match its manifest."""


class TrainingError(FedPeftError):
    """Local training or evaluation failed."""


class CodecError(FedPeftError):
    """A message or update cannot be encoded or decoded safely."""


class AuthError(CodecError):
    """A message is unsigned, forged, replayed or from an unknown sender; `reason` names which."""

    def __init__(self, message: str, reason: DropReason) -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(FedPeftError):
    """The MQTT transport failed; carries the broker's reason code when there is one."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class BrokerError(TransportError):
    """A local broker could not be started or reached."""


class ProtocolError(FedPeftError):
    """A peer broke the round protocol (wrong round, unknown device, refused join ...)."""


class DataError(FedPeftError):
    """A data set, its files or a partition spec is wrong."""


class MeteringError(FedPeftError):
    """A resource or bandwidth measurement could not be taken or parsed."""


class PrivacyError(FedPeftError):
    """Differential privacy cannot be applied as configured, or a budget is spent."""


class BudgetExhaustedError(PrivacyError):
    """A device has spent its privacy budget and must not train again."""


class CheckpointError(FedPeftError):
    """A checkpoint or run directory is missing, corrupt or does not match the run."""


class ExportError(FedPeftError):
    """An ONNX export failed or its parity check disagreed with PyTorch."""


class DashboardError(FedPeftError):
    """The dashboard cannot be served as asked (bad address, port taken, missing run directory)."""


class TrackingError(FedPeftError):
    """An experiment tracker (TensorBoard, MLflow) cannot be set up as configured."""


class LabError(FedPeftError):
    """The network lab cannot build or run its namespaces, links or programs."""


class StudyError(FedPeftError):
    """A study's run failed to execute or its study directory does not match the study."""
