"""Evaluation: query and gallery datasets, the DDP-exact metric accumulator and the one evaluation loop."""

from zscir.evaluation.loop import EvaluationLoop
from zscir.evaluation.metric import BenchmarkMetric

__all__ = ["BenchmarkMetric", "EvaluationLoop"]
