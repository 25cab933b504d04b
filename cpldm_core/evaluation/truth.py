"""Truth recovery against the interventional truth, with nothing fitted per data type.

The simulator renders the estimand directly: per compound, images under confounders drawn from p'(C) with
fresh cells, profiled like every other dataset and stored as the features dataset ``truth`` (one plate per
draw, each draw with its own DMSO images). Its treatment profiles are made by the *same recipe* as a data
type's (DMSO MAD normalisation per plate = draw, mean per compound) and written as the ``truth_profiles``
table.

Common feature set: the features the recipe selects on the truth dataset itself (variant among DMSO ->
MAD -> outlier drop -> pycytominer selection). It is chosen once, from the one dataset no data type can bias,
so every data type is compared on exactly the same columns; a data type's own selection (or an intersection
over data types) would change with the set of data types evaluated and let a biased data type shape the yard
stick. Every data type is normalised on those columns exactly like the truth (per plate / draw against its
DMSO rows, clipped at the recipe's outlier threshold). Where a plate's DMSO rows do not vary in a column
(MAD 0: e.g. a count equal in every DMSO draw) the plate cannot scale it: those values are missing, the
compound mean uses the other plates, and a compound missing everywhere gets 0 (the DMSO median).

Truth recovery of a compound is the Pearson and the Spearman correlation, across the common features,
between its treatment profile and its truth profile, each centred on its data type's mean compound (so a
component shared by every treatment is not credited). Nothing is fitted: a bias that follows the labels (a
per-MoA offset) moves the profile away from the truth and lowers the correlation, whereas a map fitted per
data type (the former ridge metric) absorbed it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cpldm_core.evaluation.normalize import MAD_TO_SD, _reference_rows

TRUTH_DATASET = "truth"


def normalize_masked(values: np.ndarray, groups: np.ndarray, is_control: np.ndarray, clip: float,
                     epsilon: float = 1e-18) -> np.ndarray:
    """MAD normalisation against each group's control rows, NaN where the group cannot scale a feature.

    Args:
        values: (n, f) float raw features (NaN allowed). groups: (n,) plate ids (a draw for synthetic/truth).
        is_control: (n,) bool DMSO rows; a group without controls uses all its rows.
        clip: clip normalised values to +-clip (the recipe's outlier threshold; <= 0 = no clip).
        epsilon: added to the scaled MAD.

    Returns:
        (n, f) float32 normalised values (units: DMSO robust SDs); NaN where the group's control MAD is 0 or
        undefined, or the input was not finite.
    """
    values = np.asarray(values, dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    groups = np.asarray(groups)
    is_control = np.asarray(is_control, dtype=bool)
    out = np.full(values.shape, np.nan, dtype=np.float32)
    for _, rows, ref_rows, _ in _reference_rows(groups, is_control):   # the recipe's own control-row rule
        ref = values[ref_rows]
        with np.errstate(all="ignore"):
            median = np.nanmedian(ref, axis=0)
            mad = np.nanmedian(np.abs(ref - median), axis=0) * MAD_TO_SD
            scaled = (values[rows] - median) / (mad + epsilon)
        usable = np.isfinite(mad) & (mad > 0)
        scaled[:, ~usable] = np.nan
        if clip > 0:
            scaled = np.clip(scaled, -clip, clip)
        out[rows] = scaled.astype(np.float32)
    return out


def compound_means(compounds: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean per compound over the kept rows, ignoring NaN; a feature missing in every row of a compound is 0.

    Returns:
        (sorted compound ids (m,) object, (m, f) float32).
    """
    keep = np.asarray(keep, dtype=bool)
    frame = pd.DataFrame(np.asarray(values, dtype=np.float64)[keep])
    means = frame.groupby(np.asarray(compounds, dtype=object)[keep]).mean().sort_index()
    return means.index.to_numpy(dtype=object), means.fillna(0.0).to_numpy(dtype=np.float32)


def truth_space_profiles(meta: pd.DataFrame, values: np.ndarray, names: list[str], features: list[str],
                         is_control: np.ndarray, keep: np.ndarray, clip: float, epsilon: float = 1e-18,
                         transform=None) -> tuple[np.ndarray, np.ndarray]:
    """A data type's treatment profiles on the common (truth-selected) features, normalised like the truth.

    Args:
        meta: n rows with Metadata_Plate and Metadata_JCP2022. values: (n, F) raw features named ``names``.
        features: the common feature set (must all be in ``names``).
        is_control: (n,) DMSO rows. keep: (n,) rows averaged into treatment profiles (treatments; for
            ``real`` the wells a compound's profile is built from).
        clip, epsilon: as :func:`normalize_masked`.
        transform: optional callable (n, k) -> (n, k) applied to the normalised well values (NaN set to 0
            first) before averaging: Harmony for ``real-harmony``.

    Returns:
        (sorted compound ids, (m, k) float32 profiles), k = len(features).
    """
    position = {n: i for i, n in enumerate(names)}
    missing = [f for f in features if f not in position]
    if missing:
        raise ValueError(f"{len(missing)} truth feature(s) missing from the data type, e.g. {missing[:3]}")
    cols = [position[f] for f in features]
    plates = meta["Metadata_Plate"].fillna("NA").astype(str).to_numpy()
    normalised = normalize_masked(np.asarray(values)[:, cols], plates, is_control, clip, epsilon)
    if transform is not None:
        normalised = np.asarray(transform(np.nan_to_num(normalised, nan=0.0)), dtype=np.float32)
    return compound_means(meta["Metadata_JCP2022"].astype(str).to_numpy(), normalised, keep)


def rowwise_correlations(profiles: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, Pearson and Spearman correlation of ``profiles[i]`` with ``truth[i]`` across features.

    Args:
        profiles, truth: (n, k) float, aligned rows (same compound), same columns.

    Returns:
        (pearson (n,), spearman (n,)) float64; NaN where a row is constant.
    """
    x = np.asarray(profiles, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"profiles {x.shape} and truth {y.shape} differ")

    def pearson(a, b):
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
        denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, (a * b).sum(axis=1) / denom, np.nan)

    # Spearman = Pearson of average ranks (ties share their mean rank, as scipy)
    return pearson(x, y), pearson(rankdata(x, axis=1), rankdata(y, axis=1))


def truth_recovery(compounds: np.ndarray, profiles: np.ndarray, truth_ids: np.ndarray, truth: np.ndarray,
                   groups: np.ndarray | None = None) -> pd.DataFrame:
    """Per compound with a truth profile: Pearson and Spearman r of its profile with the truth profile.

    Both sides are first centred on their own mean compound (the column mean over the compounds compared,
    within each of ``groups``: the query split, so that a compound's score does not depend on which wells
    another split's compounds were averaged over): what is scored is how each compound differs from the
    others, not a component every treatment shares.
    Without centring, the no-effect control (no compound changes anything) gave the c-aware oracle a recovery
    of 0.19 against real's -0.03: treatment wells drawn from p'(C) differ from the DMSO wells they are
    normalised against in the same way for every compound, in the oracle and in the truth alike, and that
    shared vector correlated with itself (docs/world.md).

    Args:
        compounds: (m,) ids of ``profiles`` rows (m, k). truth_ids: (t,) ids of ``truth`` rows (t, k); both on
            the common feature set, same column order.
        groups: optional (m,) group of each ``profiles`` row (e.g. seen / unseen); centring is per group.

    Returns:
        DataFrame [Metadata_JCP2022, pearson_r, spearman_r] for the compounds in both, sorted by id.
    """
    row_of = {c: i for i, c in enumerate(truth_ids)}
    common = sorted(c for c in compounds if c in row_of)
    pos = {c: i for i, c in enumerate(compounds)}
    k = np.shape(truth)[1]
    p = np.asarray(profiles, np.float64)[[pos[c] for c in common]] if common else np.zeros((0, k))
    t = np.asarray(truth, np.float64)[[row_of[c] for c in common]] if common else np.zeros((0, k))
    group_of = (np.asarray(groups, dtype=object)[[pos[c] for c in common]] if groups is not None
                else np.zeros(len(common), dtype=object))
    for g in pd.unique(group_of):
        rows = group_of == g
        if rows.sum() > 1:   # a lone compound has no "others" to differ from: left as it is
            p[rows] -= p[rows].mean(axis=0)
            t[rows] -= t[rows].mean(axis=0)
    pr, sr = rowwise_correlations(p, t)
    return pd.DataFrame({"Metadata_JCP2022": np.array(common, dtype=object), "pearson_r": pr, "spearman_r": sr})
