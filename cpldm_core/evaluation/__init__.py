"""Evaluation of profiles: normalisation, feature selection, Harmony, labels, subprofile NN scoring, metrics,
cross-validation, statistics, ground-truth recovery and the report. Pure compute (no Ray, DuckDB, S3).

Modules: ``config`` (EvaluateConfig, PRESETS), ``normalize``, ``feature_select``, ``harmony``, ``labels``,
``subprofiles``, ``metrics``, ``crossval``, ``statistics``, ``truth``, ``baselines``, ``recipe`` (the whole recipe
of one data type), ``copairs_metrics``, ``report``,
``simulated_profiles`` (a profile-level simulated world for tests and benchmarks).
"""
from cpldm_core.evaluation.config import PRESETS, EvaluateConfig, preset

__all__ = ["EvaluateConfig", "PRESETS", "preset"]
