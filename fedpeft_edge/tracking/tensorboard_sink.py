"""A run-log sink writing TensorBoard event files (torch's SummaryWriter): round and device scalars, config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import TrackingError
from fedpeft_edge.tracking.scalars import ScalarFolder, flatten_config

log = logging.getLogger(__name__)


class TensorBoardSink:
    """Scalars at step = round number, under `round/...` and `device/<id>/...`; the config as text."""

    def __init__(self, cfg: Any, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackingError("tracking_args.enable_tensorboard needs the tensorboard package: "
                                "pip install 'fedpeft-edge[tracking]'") from exc
        from fedpeft_edge.config import config_to_dict

        self.log_dir = Path(cfg.tracking_args.tensorboard_dir or Path(run_dir) / "tensorboard")
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        lines = (f"    {k} = {v}" for k, v in flatten_config(config_to_dict(cfg)).items())
        self._writer.add_text("config", "\n".join(lines), global_step=0)  # indented: markdown code
        self._folder = ScalarFolder()
        log.info("TensorBoard event files in %s", self.log_dir)

    def write(self, record: dict[str, Any]) -> None:
        for scalars, step in self._folder.feed(record):
            wall = record.get("time")
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=step, walltime=wall)
        if record.get("kind") == "round":
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
