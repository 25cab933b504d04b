"""Robust MAD normalisation of profiles against DMSO (negative control) rows, per group.

Real data: one group per plate (the JUMP recipe): ``(x - median_DMSO) / (MAD_DMSO * 1.4826 + eps)``,
the same transform as pycytominer's ``normalize(method="mad_robustize", samples="Metadata_pert_type ==
'negcon'")`` applied plate by plate (checked in tests).

Synthetic data (the project's equivalent, see docs/evaluate.md): a generation run has no plates; its
"well" rows are g-estimation draws whose confounders were drawn independently of the compound. DMSO images
are generated under the same draws, so the whole run forms one group (``Metadata_Plate == "synthetic"``)
normalised against its generated DMSO rows. Normalising draws and then averaging them equals averaging and
then normalising (the transform is affine within a group), so the g-estimate is unchanged by the order.
When a group holds no control row, all of its rows are used as the reference (pycytominer ``samples="all"``)
and the group is reported back so the stage can log it.

Before normalising, :func:`variant_features` keeps only features that vary among the controls of every group
(the JUMP profiling recipe's ``var`` step, ``select_variant_features``): a feature whose control MAD is 0 (a
count that happens to be equal in every DMSO well, common with few controls, e.g. N = 10 generated DMSO draws)
would be divided by ``epsilon`` alone and reach ~1e17, drowning every other feature in any correlation.
"""
from __future__ import annotations

import warnings

import numpy as np

#: Consistency constant making the MAD an estimator of the normal SD (scipy ``scale="normal"``).
MAD_TO_SD = 1.4826022185056018
#: JUMP profiling recipe (``select_variant_features``): a feature is variant in a plate when its control MAD is
#: not 0 and its absolute coefficient of variation (MAD / median) exceeds this.
RECIPE_MIN_ABS_COEF_VAR = 1e-3


def _reference_rows(groups: np.ndarray, is_control: np.ndarray):
    """Yield ``(group, rows, reference rows, has_controls)``: a group's controls, or all its rows without any."""
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        ref_rows = rows[is_control[rows]]
        yield group, rows, (ref_rows if len(ref_rows) else rows), bool(len(ref_rows))


def variant_features(values: np.ndarray, groups: np.ndarray, is_control: np.ndarray,
                     min_abs_coef_var: float = RECIPE_MIN_ABS_COEF_VAR) -> np.ndarray:
    """Features that vary among the control rows of every group (the JUMP recipe's variant-feature filter).

    Per group (plate; one synthetic run), on its control rows (all rows when it has none): unscaled MAD
    (``scipy.stats.median_abs_deviation``, NaN omitted) != 0 and ``|MAD / median|`` > ``min_abs_coef_var``,
    where a zero median counts as a coefficient of 0, as the recipe's ``fillna(0).replace(inf, 0)`` does.

    Args:
        values: (n, f) float raw (not yet normalised) profiles; NaN allowed.
        groups: (n,) group labels. is_control: (n,) bool.
        min_abs_coef_var: the recipe's 1e-3.

    Returns:
        (f,) bool, True for features variant in every group.
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    is_control = np.asarray(is_control, dtype=bool)
    keep = np.ones(values.shape[1], dtype=bool)
    for _, _, ref_rows, _ in _reference_rows(groups, is_control):
        ref = values[ref_rows]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns: NaN statistics, not variant
            median = np.nanmedian(ref, axis=0)
            mad = np.nanmedian(np.abs(ref - median), axis=0)
            coef = np.abs(np.where(median != 0, mad / median, 0.0))
        keep &= (mad != 0) & np.isfinite(mad) & (np.nan_to_num(coef, nan=0.0, posinf=0.0) > min_abs_coef_var)
    return keep


def robust_mad_normalize(values: np.ndarray, groups: np.ndarray, is_control: np.ndarray,
                         epsilon: float = 1e-18) -> tuple[np.ndarray, list]:
    """Normalise each group's rows by its control rows' median and scaled MAD.

    Args:
        values: (n, f) float profiles (NaN allowed: ignored by the statistics, kept in the output).
        groups: (n,) group labels (plate ids; one value for a synthetic run).
        is_control: (n,) bool, True for DMSO rows.
        epsilon: added to the scaled MAD (pycytominer's ``mad_robustize_epsilon``).

    Returns:
        ((n, f) float32 normalised profiles, list of groups that had no control and used all rows).
    """
    values = np.asarray(values, dtype=np.float32)
    groups = np.asarray(groups)
    is_control = np.asarray(is_control, dtype=bool)
    if values.ndim != 2 or len(values) != len(groups) or len(values) != len(is_control):
        raise ValueError(f"values {values.shape}, groups {groups.shape}, is_control {is_control.shape} disagree")
    out = np.empty_like(values)
    without_controls = []
    for group, rows, ref_rows, has_controls in _reference_rows(groups, is_control):
        if not has_controls:
            without_controls.append(group)
        # float64 statistics: medians of float32 sums lose digits on large plates
        ref = values[ref_rows].astype(np.float64)
        median = np.nanmedian(ref, axis=0)
        mad = np.nanmedian(np.abs(ref - median), axis=0) * MAD_TO_SD
        out[rows] = ((values[rows] - median) / (mad + epsilon)).astype(np.float32)
    return out, without_controls
