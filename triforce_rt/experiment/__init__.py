"""`triforce run EXPERIMENT.yaml`: schema.py (the YAML schema), runner.py (rows, resume), report.py (tables, plot)."""
from .runner import run_experiment
from .schema import Experiment, load

__all__ = ["Experiment", "load", "run_experiment"]
