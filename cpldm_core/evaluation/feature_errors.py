"""Where a data type's treatment profiles differ from a reference (real or the interventional truth), per feature
and per CellProfiler feature group.

The profiles compared are evaluate's truth-space treatment profiles (:func:`cpldm_core.evaluation.truth.
truth_space_profiles`: the truth-selected features, MAD-normalised against each plate's / draw's DMSO, mean
per compound), so a value is in DMSO robust SDs and 0 is the DMSO median. Per feature, over the compounds both
sides profile:

- ``mae``: mean |profile - reference| (the whole error, including a shift every compound shares);
- ``mae_effect``: the same after centring each side on its mean compound: the error in the *compound effect*
  (how a compound differs from the others), which is what truth recovery and the subprofile scores read;
- ``effect_r``: Pearson correlation across compounds between the two sides (centring does not change it):
  does the feature rank the compounds as the reference does;
- ``effect_size`` / ``reference_effect_size``: mean |centred value| of each side: a ratio below 1 says the
  data type shrinks the compound signal in that feature.

:func:`group_errors` averages these per feature group (compartment x measurement module x channel, from the
CellProfiler name parsed by :func:`feature_group`) and gives each group's share of the total absolute error;
:func:`bootstrap_effect_r` and :func:`group_interval` give a group's mean effect r a bootstrap interval over
compounds. Used by ``benchmarks/exp_feature_errors.py`` (issue 18: where synthetic profiles lose the signal).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from storage_schemas.columns import CHANNELS

#: Channel label of features that measure no channel (AreaShape) or that are not parsed.
NO_CHANNEL = "-"
#: Per-feature columns of :func:`feature_errors` that :func:`group_errors` averages over a group's features.
MEAN_COLUMNS = ("mae", "mae_effect", "effect_r", "effect_size", "reference_effect_size")


def feature_group(name: str, channels: tuple[str, ...] = CHANNELS) -> tuple[str, str, str]:
    """(compartment, module, channel) of a CellProfiler feature name.

    ``Cells_AreaShape_Area`` -> (Cells, AreaShape, -); ``Nuclei_Intensity_MeanIntensity_ER`` -> (Nuclei,
    Intensity, ER); ``Cytoplasm_Texture_Contrast_DNA_3_00_256`` -> (Cytoplasm, Texture, DNA);
    ``Cells_Correlation_Correlation_AGP_DNA`` -> (Cells, Correlation, AGP-DNA) (a channel pair, in name order);
    ``Cells_RadialDistribution_FracAtD_ER_1of4`` -> (Cells, RadialDistribution, ER).

    Args:
        name: ``<Compartment>_<Module>_<Measure>[_<Channel>...]`` (storage_schemas.columns.FEATURE_COLUMNS).
        channels: channel names recognised among the name's parts.

    Raises:
        ValueError: a name without at least compartment, module and measure parts.
    """
    parts = name.split("_")
    if len(parts) < 3:
        raise ValueError(f"feature {name!r} is not <Compartment>_<Module>_<Measure>[_<Channel>]")
    found = [p for p in parts[2:] if p in channels]
    # Correlation_Correlation_AGP_DNA names a pair; any other feature names at most one channel
    return parts[0], parts[1], "-".join(found) if found else NO_CHANNEL


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def _column_pearson(pc: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """(k,) Pearson r of each column of two column-centred (m, k) arrays; NaN where a column is constant.
    (``truth.rowwise_correlations`` is the row-wise twin, with Spearman, too slow for the bootstrap.)"""
    denom = np.sqrt((pc * pc).sum(axis=0) * (rc * rc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (pc * rc).sum(axis=0) / denom, np.nan)


def feature_errors(profiles: np.ndarray, reference: np.ndarray, features: list[str],
                   channels: tuple[str, ...] = CHANNELS) -> pd.DataFrame:
    """Per-feature error of ``profiles`` against ``reference`` over the same compounds.

    Args:
        profiles, reference: (m, k) float treatment profiles of the same m compounds (rows aligned) on the same
            k features (columns aligned), DMSO robust SD units; no NaN (truth-space profiles fill with 0).
        features: the k feature names.

    Returns:
        DataFrame, one row per feature: [feature, compartment, module, channel, mae, mae_effect, effect_r,
        effect_size, reference_effect_size, abs_error, abs_error_effect] (``abs_error*``: sums over compounds;
        ``effect_r`` NaN where a side is constant over the compounds).
    """
    p = np.asarray(profiles, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 2 or p.shape[1] != len(features):
        raise ValueError(f"profiles {p.shape}, reference {r.shape} and {len(features)} features do not match")
    if not np.isfinite(p).all() or not np.isfinite(r).all():
        raise ValueError("profiles and reference must be finite (fill missing values before comparing)")
    pc, rc = _centre(p), _centre(r)
    err, err_effect = np.abs(p - r), np.abs(pc - rc)
    corr = _column_pearson(pc, rc)
    groups = [feature_group(f, channels) for f in features]
    m = max(len(p), 1)
    return pd.DataFrame({
        "feature": list(features),
        "compartment": [g[0] for g in groups], "module": [g[1] for g in groups], "channel": [g[2] for g in groups],
        "mae": err.sum(axis=0) / m, "mae_effect": err_effect.sum(axis=0) / m, "effect_r": corr,
        "effect_size": np.abs(pc).sum(axis=0) / m, "reference_effect_size": np.abs(rc).sum(axis=0) / m,
        "abs_error": err.sum(axis=0), "abs_error_effect": err_effect.sum(axis=0)})


def group_errors(per_feature: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per feature group: the mean of each per-feature figure and the group's share of the total error.

    Args:
        per_feature: :func:`feature_errors` output (possibly several, with extra key columns in ``by``).
        by: grouping columns, e.g. ``["module"]`` or ``["compartment", "module", "channel"]``; the shares are
            taken within the rows that share every ``by`` column not in compartment/module/channel (e.g. per
            data type).

    Returns:
        DataFrame [*by, n_features, mae, mae_effect, effect_r, effect_size, reference_effect_size, effect_ratio,
        share_error, share_error_effect]: ``effect_r`` is the mean over the group's features with a defined r;
        ``effect_ratio`` = effect_size / reference_effect_size; ``share_error`` = the group's summed absolute
        error / the summed absolute error of all features (so shares add to 1 and grow with the group's size).
    """
    outer = [c for c in by if c not in ("compartment", "module", "channel")]
    frame = per_feature.copy()
    for col in ("abs_error", "abs_error_effect"):   # the total each share is taken of
        frame[f"total_{col}"] = (frame.groupby(outer, dropna=False)[col].transform("sum") if outer
                                 else frame[col].sum())
    if not by:   # one group of every feature
        frame, by = frame.assign(_all="all"), ["_all"]
    grouped = frame.groupby(by, sort=True, dropna=False)
    out = grouped[list(MEAN_COLUMNS)].mean()
    out.insert(0, "n_features", grouped.size())
    out["effect_ratio"] = out["effect_size"] / out["reference_effect_size"]
    sums = grouped[["abs_error", "abs_error_effect", "total_abs_error", "total_abs_error_effect"]].agg(
        {"abs_error": "sum", "abs_error_effect": "sum", "total_abs_error": "first", "total_abs_error_effect": "first"})
    with np.errstate(invalid="ignore", divide="ignore"):
        out["share_error"] = sums["abs_error"] / sums["total_abs_error"]
        out["share_error_effect"] = sums["abs_error_effect"] / sums["total_abs_error_effect"]
    return out.reset_index().drop(columns=["_all"], errors="ignore")


def bootstrap_effect_r(profiles: np.ndarray, reference: np.ndarray, n_boot: int = 200, seed: int = 0
                       ) -> np.ndarray:
    """Per-feature effect r on bootstrap resamples of the compounds.

    Per replicate the m compounds are drawn with replacement (``default_rng(seed)``, one draw of m indices per
    replicate) and every feature's Pearson r across the drawn compounds is recomputed.

    Args:
        profiles, reference: (m, k) float aligned treatment profiles (as :func:`feature_errors`).

    Returns:
        (n_boot, k) float64; NaN where a side is constant in the draw.
    """
    p = np.asarray(profiles, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, p.shape[1]))
    for b in range(n_boot):
        idx = rng.integers(0, len(p), size=len(p))
        out[b] = _column_pearson(_centre(p[idx]), _centre(r[idx]))
    return out


def group_interval(boot_r: np.ndarray, groups: np.ndarray, level: float = 0.95) -> pd.DataFrame:
    """Percentile interval of each group's mean effect r over bootstrap replicates.

    Args:
        boot_r: (n_boot, k) per-feature r (:func:`bootstrap_effect_r`); NaN features are left out of a mean.
        groups: (k,) group label of each feature. level: two-sided coverage.

    Returns:
        DataFrame [group, effect_r_lo, effect_r_hi], one row per distinct label (sorted).
    """
    groups = np.asarray(groups, dtype=object)
    labels = sorted(set(groups))
    member = np.stack([groups == g for g in labels]).astype(np.float64)      # (G, k)
    ok = np.isfinite(boot_r)
    counts = ok.astype(np.float64) @ member.T                                # (n_boot, G)
    sums = np.where(ok, boot_r, 0.0) @ member.T
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():   # a group whose features are constant in every draw: NaN, said by NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return pd.DataFrame({"group": labels, "effect_r_lo": lo, "effect_r_hi": hi})
