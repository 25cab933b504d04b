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
"""
from __future__ import annotations

import numpy as np

#: Consistency constant making the MAD an estimator of the normal SD (scipy ``scale="normal"``).
MAD_TO_SD = 1.4826022185056018


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
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        ref_rows = rows[is_control[rows]]
        if len(ref_rows) == 0:
            ref_rows = rows
            without_controls.append(group)
        # float64 statistics: medians of float32 sums lose digits on large plates
        ref = values[ref_rows].astype(np.float64)
        median = np.nanmedian(ref, axis=0)
        mad = np.nanmedian(np.abs(ref - median), axis=0) * MAD_TO_SD
        out[rows] = ((values[rows] - median) / (mad + epsilon)).astype(np.float32)
    return out, without_controls
