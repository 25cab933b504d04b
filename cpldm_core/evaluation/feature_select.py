"""Feature selection with pycytominer (variance, correlation, NaN), as in the JUMP profiling recipe.

pycytominer decides which *columns* to keep; on very large well-level tables the decision is made on an
evenly spaced subset of rows (``max_rows``), which keeps the correlation and frequency computations bounded
(pycytominer's correlation step is (f x f) but copies the whole table several times).

:func:`drop_and_clip_outliers` is the recipe's outlier step between normalisation and feature selection.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: pycytominer operation names this stage accepts.
KNOWN_OPS = ("variance_threshold", "correlation_threshold", "drop_na_columns", "drop_outliers")
#: JUMP profiling recipe (``remove_outliers``): after MAD normalisation, drop features whose 99th percentile of
#: absolute values exceeds 100, then clip the others to [-100, 100].
RECIPE_OUTLIER_THRESHOLD = 100.0
RECIPE_OUTLIER_QUANTILE = 0.99


def drop_and_clip_outliers(values: np.ndarray, threshold: float = RECIPE_OUTLIER_THRESHOLD,
                           quantile: float = RECIPE_OUTLIER_QUANTILE) -> tuple[np.ndarray, np.ndarray]:
    """The JUMP recipe's outlier step on normalised profiles.

    Args:
        values: (n, f) float normalised profiles (NaN ignored by the quantile, kept in the output).
        threshold: features whose ``quantile`` of |x| exceeds it are dropped; the rest are clipped to +-threshold.

    Returns:
        (kept (f,) bool, (n, f) float32 clipped values; dropped columns are returned unclipped).
    """
    values = np.asarray(values, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns have a NaN quantile: kept here,
        high = np.nanquantile(np.abs(values), quantile, axis=0)   # drop_na_columns decides about them
    kept = ~(high > threshold)
    clipped = values.copy()
    clipped[:, kept] = np.clip(values[:, kept], -threshold, threshold)
    return kept, clipped


def select_features(values: np.ndarray, feature_names: list[str], ops: tuple[str, ...] = (
        "variance_threshold", "correlation_threshold", "drop_na_columns"),
        na_cutoff: float = 0.05, corr_threshold: float = 0.9, min_variance: float = 1e-6,
        max_rows: int | None = 20000) -> list[str]:
    """Names of the features pycytominer's ``feature_select`` keeps.

    Args:
        values: (n, f) float profiles (normalised); +-inf is treated as missing.
        feature_names: the f column names (CellProfiler style).
        ops: pycytominer operations in order.
        na_cutoff, corr_threshold, min_variance: pycytominer parameters (its defaults; pycytominer >= 1.5's
            ``variance_threshold`` drops features with variance < ``min_variance``).
        max_rows: choose on at most this many evenly spaced rows (None = all).

    Returns:
        Kept feature names, in their original order.
    """
    import pycytominer

    unknown = [op for op in ops if op not in KNOWN_OPS]
    if unknown:
        raise ValueError(f"unknown feature-selection operation(s) {unknown}; known: {KNOWN_OPS}")
    if not ops:
        return list(feature_names)
    values = np.asarray(values)
    if max_rows is not None and len(values) > max_rows:
        rows = np.linspace(0, len(values) - 1, max_rows).round().astype(int)
        values = values[rows]
    frame = pd.DataFrame(np.where(np.isfinite(values), values, np.nan).astype(np.float64),
                         columns=list(feature_names))
    selected = pycytominer.feature_select(
        frame, features=list(feature_names), operation=list(ops), na_cutoff=na_cutoff,
        corr_threshold=corr_threshold, min_variance=min_variance)
    kept = set(selected.columns)
    names = [f for f in feature_names if f in kept]
    log.info("feature selection %s: %d -> %d features", "+".join(ops), len(feature_names), len(names))
    return names
