"""One site (5-channel image) -> single-cell features, image-level profile, cell count and quality flags."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cpldm_core.features import measure
from cpldm_core.features.config import FeatureConfig, ProfileConfig
from cpldm_core.features.segmentation import (Segmentation, correct_illumination, qc_flags, segment,
                                              self_illumination, to_float)
from storage_schemas.columns import CHANNELS


@dataclass(frozen=True)
class SiteProfile:
    """Result of :func:`profile_site`.

    Attributes:
        object_numbers: (N,) int32 object numbers (nucleus labels) of the N cells.
        cells: (N, F) float32 single-cell features, columns ``names``.
        image: (F,) float32 median over cells (NaN when N == 0).
        names: F CellProfiler feature names.
        flags: quality flags ("blur", "saturation", "few_cells").
        segmentation: the label images.
    """

    object_numbers: np.ndarray
    cells: np.ndarray
    image: np.ndarray
    names: tuple[str, ...]
    flags: tuple[str, ...]
    segmentation: Segmentation

    @property
    def count(self) -> int:
        return int(len(self.object_numbers))


def measure_objects(image: np.ndarray, seg: Segmentation, cfg: FeatureConfig,
                    channels: tuple[str, ...] = CHANNELS) -> dict[str, np.ndarray]:
    """Features of every cell of ``seg`` on ``image`` (C, H, W) float32 in [0, 1], by ``cfg.feature_set``."""
    ids = np.unique(seg.nuclei)
    ids = ids[ids > 0]
    if cfg.feature_set == "default":
        return measure.default_features(image, seg.compartments(), channels, ids, cfg.texture_scale,
                                        cfg.texture_directions)
    if cfg.feature_set == "cellprofiler":
        return measure.cellprofiler_features(image, seg.compartments(), channels, ids)
    return measure.full_features(image, seg.compartments(), channels, ids, costes=cfg.full_costes)


@lru_cache(maxsize=8)
def feature_names(cfg: FeatureConfig, channels: tuple[str, ...] = CHANNELS) -> tuple[str, ...]:
    """The feature columns ``cfg`` produces, in order (measured once on a synthetic two-cell image)."""
    size = 48
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size), np.int32)
    cells = np.zeros((size, size), np.int32)
    for k, cx in enumerate((12, 36), start=1):
        cells[(yy - 24) ** 2 + (xx - cx) ** 2 <= 10 ** 2] = k
        nuclei[(yy - 24) ** 2 + (xx - cx) ** 2 <= 5 ** 2] = k
    seg = Segmentation(nuclei=nuclei, cells=cells, cytoplasm=np.where(nuclei > 0, 0, cells))
    rng = np.random.default_rng(0)
    image = (0.2 + 0.5 * rng.random((len(channels), size, size))).astype(np.float32)
    return tuple(measure_objects(image, seg, cfg, channels))


def profile_site(raw: np.ndarray, cfg: ProfileConfig, illumination: np.ndarray | None = None) -> SiteProfile:
    """Segment and measure one site.

    Args:
        raw: (5, H, W) uint16 (or float in [0, 1]) in CHANNELS order.
        illumination: optional (5, H, W) illumination function to divide by ("files" mode); with
            ``cfg.segmentation.illumination == "self"`` a per-image flat-field is estimated instead.
    """
    if raw.ndim != 3 or raw.shape[0] != len(CHANNELS):
        raise ValueError(f"expected a ({len(CHANNELS)}, H, W) image in channel order {CHANNELS}, got {raw.shape}")
    image = to_float(raw)
    if cfg.segmentation.illumination == "self":
        illumination = self_illumination(image, cfg.segmentation.illumination_sigma_frac)
    elif cfg.segmentation.illumination == "none":
        illumination = None
    image = correct_illumination(image, illumination)
    seg = segment(image, cfg.segmentation)
    features = measure_objects(image, seg, cfg.features)
    names = feature_names(cfg.features)
    ids = np.unique(seg.nuclei)
    ids = ids[ids > 0].astype(np.int32)
    cells = np.full((len(ids), len(names)), np.nan, np.float32)
    for k, name in enumerate(names):
        if name in features:  # cp_measure drops a compartment's columns when it has no objects
            cells[:, k] = features[name]
    if len(ids):
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (empty cytoplasm) stay NaN
                image_profile = np.nanmedian(cells, axis=0).astype(np.float32)
    else:
        image_profile = np.full(len(names), np.nan, np.float32)
    flags = qc_flags(raw, image, len(ids), cfg.qc)
    return SiteProfile(object_numbers=ids, cells=cells, image=image_profile, names=names, flags=tuple(flags),
                       segmentation=seg)
