"""Direct causal check against the simulator's truth: how close each data type's treatment profile is to
what the compound's true phenotype alone implies.

The truth (``Truth_*`` columns, standard units) and the profiles (CellProfiler features) live in different
spaces, so the forward map truth -> features (P -> O) is learnt with ridge regression, cross-validated over
compounds (a compound's expected profile never used its own profile). Per compound, the recovery is the
Pearson correlation, across features, between its profile and the profile its true phenotype implies, both
taken as deviations from the average profile of the fold's training compounds: a component every compound
shares (synthetic images that all differ from the DMSO reference the same way, say) would otherwise correlate
perfectly with the intercept of the map and push every compound's r towards 1 whatever its own phenotype.
Whatever the truth cannot explain lowers it: confounder effects left in a profile (batch offsets of the
batches a compound happened to be screened in) as well as noise. Per feature, the cross-validated R^2.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TRUTH_PREFIX = "Truth_"
#: Ridge penalties tried by RidgeCV (efficient leave-one-out), a log grid wide enough for standardised inputs.
RIDGE_ALPHAS = tuple(np.logspace(-2, 4, 13))


def truth_recovery(profiles: np.ndarray, truth: np.ndarray, n_folds: int = 5, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated agreement of profiles with their truth-implied profiles.

    Args:
        profiles: (n, f) float treatment profiles (NaN-free). truth: (n, t) float true effects.
        n_folds: KFold splits over compounds. seed: shuffling seed.

    Returns:
        (per-compound Pearson r (n,) float64 of the deviations from the training compounds' average profile
        (NaN where undefined), per-feature R^2 (f,) float64).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(truth, dtype=np.float64)
    y = np.asarray(profiles, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"profiles {y.shape} and truth {x.shape} have different compound counts")
    n_folds = max(2, min(n_folds, len(x)))
    expected = np.zeros_like(y)
    yc = np.zeros_like(y)   # deviations from the average compound profile of the fold's training compounds
    ec = np.zeros_like(y)
    for train, test in KFold(n_folds, shuffle=True, random_state=seed).split(x):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        model.fit(x[train], y[train])
        expected[test] = model.predict(x[test])
        # the training compounds' average, not all compounds': an average that includes the held-out compound
        # would make its own deviation and its prediction's deviation anti-correlated by construction
        average = y[train].mean(axis=0, keepdims=True)
        yc[test] = y[test] - average
        ec[test] = expected[test] - average
    yc = yc - yc.mean(axis=1, keepdims=True)
    ec = ec - ec.mean(axis=1, keepdims=True)
    denom = np.sqrt((yc ** 2).sum(axis=1) * (ec ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_compound = np.where(denom > 0, (yc * ec).sum(axis=1) / denom, np.nan)
    ss_res = ((y - expected) ** 2).sum(axis=0)
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.nan)
    return per_compound, r2


def truth_columns(frame: pd.DataFrame) -> list[str]:
    """The ``Truth_*`` columns of a truth table, numeric and not constant."""
    cols = [c for c in frame.columns if c.startswith(TRUTH_PREFIX) and pd.api.types.is_numeric_dtype(frame[c])]
    return [c for c in cols if frame[c].nunique(dropna=True) > 1]
