"""A run-log sink writing TensorBoard event files (torch's SummaryWriter): round and device scalars, config."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import TrackingError
from fedpeft_edge.records import RoundRecord
from fedpeft_edge.tracking.scalars import ScalarFolder, flatten_config

log = logging.getLogger(__name__)


class TensorBoardSink:
    """Scalars at step = round number, under `round/...` and `device/<id>/...`; the config as text."""

    def __init__(self, cfg: Any, run_dir: str | Path) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise TrackingError("tracking_args.enable_tensorboard needs the tensorboard package: "
                                "pip install 'fedpeft-edge[tracking]'")
        self.cfg = cfg
        self.log_dir = Path(cfg.tracking_args.tensorboard_dir or Path(run_dir) / "tensorboard")
        self._folder = ScalarFolder()
        self._writer_: Any = None

    @property
    def _writer(self) -> Any:
        """The SummaryWriter, made on first use (on the sink's thread: importing tensorboard takes seconds)."""
        if self._writer_ is None:
            from torch.utils.tensorboard import SummaryWriter

            from fedpeft_edge.config import redacted_config_dict

            writer = SummaryWriter(log_dir=str(self.log_dir))
            lines = (f"    {k} = {v}" for k, v in flatten_config(redacted_config_dict(self.cfg)).items())
            writer.add_text("config", "\n".join(lines), global_step=0)  # indented: a markdown code block
            self._writer_ = writer
            log.info("TensorBoard event files in %s", self.log_dir)
        return self._writer_

    def write(self, record: dict[str, Any]) -> None:
        writer = self._writer
        for scalars, step in self._folder.feed(record):
            wall = record.get("time")
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step, walltime=wall)
        if record.get("kind") == RoundRecord.KIND:
            writer.flush()

    def close(self) -> None:
        if self._writer_ is not None:
            self._writer_.close()
