"""Studies: a grid over run-config keys expanded into runs, executed, resumed and compared in one report."""

from fedpeft_edge.study.grid import PlannedRun, config_hash, expand_study
from fedpeft_edge.study.runner import Executor, StudyRunner

__all__ = ["Executor", "PlannedRun", "StudyRunner", "config_hash", "expand_study"]
