"""Keras callbacks: when to read optimizer statistics, and a guard against divergence."""

from optiscope.callbacks.guard import DivergenceGuard
from optiscope.callbacks.logger import OptimizerStatsLogger

__all__ = ["DivergenceGuard", "OptimizerStatsLogger"]
