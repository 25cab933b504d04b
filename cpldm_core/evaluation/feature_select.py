"""Feature selection with pycytominer (variance, correlation, NaN), as in the JUMP profiling recipe.

pycytominer decides which *columns* to keep; on very large well-level tables the decision is made on an
evenly spaced subset of rows (``max_rows``), which keeps the correlation and frequency computations bounded
(pycytominer's correlation step is (f x f) but copies the whole table several times).

"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: pycytominer operation names this stage accepts.
KNOWN_OPS = ("variance_threshold", "correlation_threshold", "drop_na_columns", "drop_outliers")


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
