"""Image profiling: segmentation and CellProfiler-compatible features (pure numpy/scipy/scikit-image/cp_measure).

- :mod:`.config`: :class:`ProfileConfig` and its presets (tiny, demo, jump).
- :mod:`.segmentation`: illumination correction, quality flags, nuclei, cells, cytoplasm.
- :mod:`.measure`: per-object features named as CellProfiler names them (default vectorised set; full set via
  cp_measure).
- :mod:`.site`: one site -> single-cell features + image profile.
- :mod:`.aggregate`: image -> well -> treatment profiles.
"""
from cpldm_core.features.config import PRESETS, FeatureConfig, ProfileConfig, QCConfig, SegmentationConfig
from cpldm_core.features.site import SiteProfile, feature_names, profile_site

__all__ = ["PRESETS", "FeatureConfig", "ProfileConfig", "QCConfig", "SegmentationConfig", "SiteProfile",
           "feature_names", "profile_site"]
