"""Capture and replay of fixed-shape decoding steps; eager where there is no CUDA. Never imports triforce_rt."""
from .step import StepGraphs, capturing

__all__ = ["StepGraphs", "capturing"]
