"""Profile aggregation, as JUMP does it: single cells -> image (median) -> well (mean over sites) ->
treatment (mean over replicate wells). For synthetic images a "well" is one g-estimation draw and the
treatment mean over draws is the g-estimate (CONTRACTS.md).

Pure pandas: frames hold ``Metadata_*`` columns and CellProfiler feature columns
(:data:`FEATURE_PATTERN`); feature values are float32.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from storage_schemas.columns import FEATURE_COLUMNS

FEATURE_PATTERN = re.compile(FEATURE_COLUMNS)

#: Columns that identify a well (real) or a draw (synthetic); Metadata_Draw is null for real wells.
WELL_KEYS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022",
             "Metadata_pert_type", "Metadata_Draw")
TREATMENT_KEYS = ("Metadata_JCP2022", "Metadata_pert_type")


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """CellProfiler feature columns of ``frame`` in order."""
    return [c for c in frame.columns if FEATURE_PATTERN.fullmatch(c)]


def _group_mean(frame: pd.DataFrame, keys: tuple[str, ...], count_name: str) -> pd.DataFrame:
    feats = feature_columns(frame)
    keys = [k for k in keys if k in frame.columns]
    frame = frame[[*keys, *feats]].copy()  # one consolidated block: groupby on a fragmented frame is slow
    grouped = frame.groupby(keys, dropna=False, sort=True)
    # float64 accumulation, float32 storage (the schema's feature type)
    out = pd.concat([grouped.size().astype(np.int32).rename(count_name),
                     grouped[feats].mean().astype(np.float32)], axis=1)
    return out.copy().reset_index()  # copy consolidates the concatenated blocks before keys are inserted


def image_from_cells(cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Median over cells per image (``keys`` identify an image) plus ``Metadata_CellCount``."""
    feats = feature_columns(cells)
    grouped = cells[[*keys, *feats]].copy().groupby(keys, dropna=False, sort=True)
    out = pd.concat([grouped.size().astype(np.int32).rename("Metadata_CellCount"),
                     grouped[feats].median().astype(np.float32)], axis=1)
    return out.copy().reset_index()


def well_from_images(images: pd.DataFrame) -> pd.DataFrame:
    """Mean over the sites of each well (real) / the images of each draw (synthetic), with
    ``Metadata_SiteCount``. Images with no cells (all-NaN features) count as sites but do not bias the mean."""
    return _group_mean(images, WELL_KEYS, "Metadata_SiteCount")


def treatment_from_wells(wells: pd.DataFrame) -> pd.DataFrame:
    """Mean over replicate wells / draws of each compound, with ``Metadata_WellCount``."""
    return _group_mean(wells, TREATMENT_KEYS, "Metadata_WellCount")
