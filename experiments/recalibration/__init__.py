"""Inference-time attention recalibration and head analysis of trained decoders.

tasks (offline evaluation problems), analysis (sink scores, massive activations,
entropy, retrieval scores), head_search (ACT's head filtering), figures, runner (the
library behind `python -m experiments.recalibrate`).
"""
