"""Configuration of the profile stage: segmentation, quality control, feature set and Ray resources.

A frozen dataclass loaded with :func:`cpldm_core.configuration.load_config`; presets in :data:`PRESETS`.
Pixel sizes are in pixels of the images being profiled, so the presets differ mainly by nuclear diameter:
the simulator's small sites (``demo``/``tiny``) versus real 1080x1080 JUMP sites at 20x (``jump``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from cpldm_core.configuration import LAKE_NAME, bounds
from cpldm_core.images import DEFAULT_MAX_PLANE_BYTES
from storage_schemas.columns import CHANNELS

#: Nuclear diameter of U2OS nuclei in JUMP cpg0016 images (20x, 1080x1080 px): CellProfiler's own nuclei outlines
#: on the JUMP pilot site BR00117006/A01/1 have a median area of ~540 px^2, i.e. a diameter of ~26 px.
JUMP_NUCLEUS_DIAMETER_PX = 26.0


@dataclass(frozen=True)
class SegmentationConfig:
    """How nuclei and cells are found.

    Attributes:
        nucleus_diameter_px: typical nuclear diameter (px); sets smoothing, minimum size and declumping distance.
        smoothing_sigma_frac: Gaussian sigma before thresholding, as a fraction of the nuclear diameter.
        min_nucleus_area_frac: nuclei smaller than this fraction of a typical nucleus' area are dropped.
        declump: split touching nuclei with a distance-transform watershed (CellProfiler "shape" declumping).
        declump_min_distance_frac: minimum distance between nuclear seeds, as a fraction of the diameter.
        discard_border_nuclei: drop nuclei touching the image border (CellProfiler's default).
        cell_channel: cytoplasmic channel the cell watershed runs on (one of CHANNELS).
        cell_threshold_factor: cell foreground = cell channel > factor * Otsu threshold (a lenient threshold
            like CellProfiler's "Otsu, three classes, middle class to foreground").
        max_cell_radius_frac: cells extend at most this many nuclear diameters beyond their nucleus.
        illumination: "auto" (default, the same rule as ``cpldm ingest``): divide by the site's ``URL_Illum*``
            functions (JUMP's per-plate .npy files) when the catalog lists them, else leave the image as is, so
            real profiles are measured on the images the model learns from; "files": the same, but a site
            without functions is an error; "self": divide each channel by its own heavily smoothed image (a
            per-image flat-field, when no illumination functions exist); "none": never correct.
        illumination_sigma_frac: Gaussian sigma of the "self" flat-field, as a fraction of the image side.
    """

    nucleus_diameter_px: float = 10.0
    smoothing_sigma_frac: float = 0.08
    min_nucleus_area_frac: float = 0.15
    declump: bool = True
    declump_min_distance_frac: float = 0.5
    discard_border_nuclei: bool = False
    cell_channel: str = "AGP"
    cell_threshold_factor: float = 0.5
    max_cell_radius_frac: float = 1.5
    illumination: Literal["auto", "none", "self", "files"] = "auto"
    illumination_sigma_frac: float = 0.25

    def __post_init__(self):
        if self.cell_channel not in CHANNELS:
            raise ValueError(f"segmentation.cell_channel={self.cell_channel!r} is not one of {CHANNELS}")
        if self.nucleus_diameter_px <= 1:
            raise ValueError("segmentation.nucleus_diameter_px must be > 1 pixel")


@dataclass(frozen=True)
class QCConfig:
    """Image quality flags (written to ``Metadata_QCFlags``; flagged images are kept, the flag says why).

    Attributes:
        blur_threshold: flag "blur" when the DNA channel's focus score (normalised Laplacian variance, see
            ``segmentation.focus_score``) is below this; 0.004 flags sites blurred by a >= ~4 px Gaussian.
        saturation_fraction: flag "saturation" when more than this fraction of any channel's pixels sit at the
            dtype maximum (uint16 65535).
        min_cells: flag "few_cells" when fewer cells than this were found.
    """

    blur_threshold: float = 0.004
    saturation_fraction: float = field(default=0.01, metadata=bounds(ge=0, le=1))
    min_cells: int = 3


@dataclass(frozen=True)
class FeatureConfig:
    """Which features are measured.

    Attributes:
        feature_set: "default" (vectorised, 354 features, ~tens of ms per small image), "cellprofiler"
            (vectorised CellProfiler-comparable set, JUMP's modules plus cp_measure's radial Zernikes: 3,024
            features for 5 channels; texture_scale/texture_directions/full_costes do not apply,
            ``measure.cellprofiler_features``; equal to cp_measure's values) or "full" (cp_measure: every
            group except Costes; ~2,955 features, tens of CPU-seconds per 1080 px site).
        texture_scale: Haralick co-occurrence distance (px); CellProfiler/JUMP use 3, 5 and 10.
        texture_directions: Haralick directions measured in the default set (0: horizontal, 1: diagonal,
            2: vertical, 3: anti-diagonal; mahotas order).
        full_costes: include Costes thresholded correlation in the full set (~85% of cp_measure's time).
    """

    feature_set: Literal["default", "cellprofiler", "full"] = "default"
    texture_scale: int = field(default=3, metadata=bounds(ge=1))
    texture_directions: tuple[int, ...] = (0,)
    full_costes: bool = False


@dataclass(frozen=True)
class ProfileConfig:
    """The profile stage.

    Attributes:
        dataset: "real" (the catalog's ``sites``) or a generation run name (``synthetic/<run>/images.zarr``).
        single_cell: also write ``features_single_cell`` (large).
        workers: Ray Data actors measuring images in parallel.
        num_cpus_per_worker: CPUs reserved per actor.
        batch_size: images per Ray Data batch.
        units_per_wave: units (plates/blocks) processed per Ray Data execution (actors start once per wave).
            Within a wave each unit is written and committed as soon as its last site is measured, so the
            driver holds only the units in flight and a killed run loses only those.
        max_plane_bytes: largest decoded TIFF plane accepted (bytes, from the TIFF header, before decoding);
            a site with a larger plane is rejected, so a small hostile file cannot ask for gigabytes.
    """

    dataset: str = field(default="real", metadata=LAKE_NAME)
    single_cell: bool = False
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    workers: int = field(default=2, metadata=bounds(ge=1))
    num_cpus_per_worker: float = 1.0
    batch_size: int = field(default=16, metadata=bounds(ge=1))
    units_per_wave: int = field(default=32, metadata=bounds(ge=1))
    max_plane_bytes: int = field(default=DEFAULT_MAX_PLANE_BYTES, metadata=bounds(ge=1))


DEMO = ProfileConfig(segmentation=SegmentationConfig(nucleus_diameter_px=12.0))
TINY = replace(DEMO, segmentation=replace(DEMO.segmentation, nucleus_diameter_px=8.0), workers=1, batch_size=4,
               units_per_wave=2)
JUMP = replace(DEMO, segmentation=replace(DEMO.segmentation, nucleus_diameter_px=JUMP_NUCLEUS_DIAMETER_PX,
                                          discard_border_nuclei=True),
               batch_size=2)

#: Real JUMP sites measured with the CellProfiler-comparable feature set.
CELLPROFILER = replace(JUMP, features=replace(JUMP.features, feature_set="cellprofiler"))

#: Named presets (``--preset``): tiny (CI), demo (embedded default), jump (real 1080x1080 JUMP sites),
#: cellprofiler (jump with the CellProfiler-comparable feature set).
PRESETS: dict[str, ProfileConfig] = {"tiny": TINY, "demo": DEMO, "jump": JUMP, "cellprofiler": CELLPROFILER}
