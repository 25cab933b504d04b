"""copairs mAP as JUMP users report it, beside the subprofile metrics.

* Phenotypic activity: replicate profiles of a compound (wells, or g-estimation draws) retrieved against
  DMSO profiles (copairs' reference-index recipe); a compound is active when its mAP's FDR-corrected
  permutation p-value is below ``threshold``.
* Phenotypic consistency: treatment profiles of compounds sharing an MoA retrieved against compounds of
  other MoAs; one mAP per MoA.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from storage_schemas.columns import COMPOUND

log = logging.getLogger(__name__)

REFERENCE = "Metadata_Reference_Index"
#: copairs' conventional significance level for "active" / "consistent".
COPAIRS_THRESHOLD = 0.05


def phenotypic_activity(values: np.ndarray, compounds: np.ndarray, is_control: np.ndarray, null_size: int,
                        seed: int = 0, threshold: float = COPAIRS_THRESHOLD) -> pd.DataFrame:
    """Per-compound activity mAP vs controls.

    Args:
        values: (n, f) replicate-level profiles (wells or draws), controls included.
        compounds: (n,) compound ids. is_control: (n,) bool (DMSO rows).
        null_size: permutations for the p-values.

    Returns:
        DataFrame [Metadata_JCP2022, mean_average_precision, corrected_p_value, below_corrected_p]; empty
        when there are no controls or no compound has two replicates.
    """
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException

    meta = pd.DataFrame({COMPOUND: np.asarray(compounds).astype(str)})
    controls = np.asarray(is_control, dtype=bool)
    meta[REFERENCE] = np.where(controls, np.arange(len(meta)), -1)
    try:
        ap = average_precision(meta, np.asarray(values, dtype=np.float32), pos_sameby=[COMPOUND, REFERENCE],
                               pos_diffby=[], neg_sameby=[], neg_diffby=[COMPOUND, REFERENCE],
                               progress_bar=False)
    except UnpairedException as exc:
        log.warning("copairs activity skipped: %s", exc)
        return pd.DataFrame(columns=[COMPOUND, "mean_average_precision", "corrected_p_value", "below_corrected_p"])
    ap = ap[~controls[ap.index]].dropna(subset=["average_precision"])
    result = mean_average_precision(ap, sameby=[COMPOUND], null_size=null_size, threshold=threshold, seed=seed,
                                    progress_bar=False)
    return result[[COMPOUND, "mean_average_precision", "corrected_p_value", "below_corrected_p"]]


def moa_consistency(values: np.ndarray, moas: np.ndarray, null_size: int, seed: int = 0,
                    threshold: float = COPAIRS_THRESHOLD) -> pd.DataFrame:
    """Per-MoA consistency mAP of treatment profiles.

    Args:
        values: (n, f) treatment profiles. moas: (n,) one MoA per compound.

    Returns:
        DataFrame [Metadata_moa, mean_average_precision, corrected_p_value, below_corrected_p] (empty when no
        MoA has two compounds or there is a single MoA).
    """
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException

    meta = pd.DataFrame({"Metadata_moa": np.asarray(moas).astype(str)})
    empty = pd.DataFrame(columns=["Metadata_moa", "mean_average_precision", "corrected_p_value",
                                  "below_corrected_p"])
    if meta["Metadata_moa"].nunique() < 2:
        return empty
    try:
        ap = average_precision(meta, np.asarray(values, dtype=np.float32), pos_sameby=["Metadata_moa"],
                               pos_diffby=[], neg_sameby=[], neg_diffby=["Metadata_moa"], progress_bar=False)
    except UnpairedException as exc:
        log.warning("copairs consistency skipped: %s", exc)
        return empty
    ap = ap.dropna(subset=["average_precision"])
    result = mean_average_precision(ap, sameby=["Metadata_moa"], null_size=null_size, threshold=threshold,
                                    seed=seed, progress_bar=False)
    return result[["Metadata_moa", "mean_average_precision", "corrected_p_value", "below_corrected_p"]]
