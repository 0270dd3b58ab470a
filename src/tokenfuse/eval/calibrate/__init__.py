"""`tokenfuse calibrate`: the reduction configuration that loses the least at a given budget, found
without training on a few dozen inputs.

A constant per-layer rate is the papers' default, not the best use of a budget. The search scores a
candidate (method, options, per-layer schedule) by how close the reduced model stays to the full one
on the calibration inputs (embedding cosine for encoders), reusing the full model's outputs, and
stops at a time limit. Schedules come from one family (`schedule.power`): from front-loaded (most
tokens go early, where attention is widest) to back-loaded, always at the same work. Stages:
  1. every candidate method with its constant schedule and with each shape of the family;
  2. the best method's options (proportional attention off; ToMe's similarity on keys);
  3. a finer shape search between the best shape's neighbours;
  4. while time remains, single points moved up or down, the others making up the budget.
A shape, a later method, and every change of stages 2-4, replaces the choice (first the method's
constant schedule) only for a gain larger than its standard error over the calibration inputs:
without that guard, the search fitted the noise of a small set (a method, a shape or a moved point
winning by a fraction of its standard error) and lost on held-out inputs (README, calibration).

The parts: `search` (candidates, trials, the staged search), `run` (what a run is asked for, the
search on each calibration set under a work or speedup budget, the held-out evaluation and its
records), `tasks` (the objective of each task: embedding cosine for text encoders, KL divergence
and a fitted temperature for classifiers).
"""

from .run import Settings, calibrate_sets, calibrated_configs, config_of, config_record, results
from .search import METHODS, OPTIONS, SHAPES, Candidate, Found, Trial, Z, constant, search, shaped
from .tasks import fit_temperature, run_classifier, run_text

__all__ = [
    "METHODS",
    "OPTIONS",
    "SHAPES",
    "Z",
    "Candidate",
    "Found",
    "Settings",
    "Trial",
    "calibrate_sets",
    "calibrated_configs",
    "config_of",
    "config_record",
    "constant",
    "fit_temperature",
    "results",
    "run_classifier",
    "run_text",
    "search",
    "shaped",
]
