"""The default (vectorised) feature set equals cp_measure's values, and names follow CellProfiler/JUMP."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from conftest import shared_path
from cpldm_core.features import measure
from cpldm_core.features.config import DEMO, FeatureConfig
from cpldm_core.features.segmentation import Segmentation
from cpldm_core.features.site import feature_names
from storage_schemas.columns import CHANNELS

#: cp_measure sums some intensities in float32 (MassDisplacement's weights): agree to float32 precision.
RTOL = 1e-4


def _scene(seed: int = 0, size: int = 96):
    """Touching ellipses (nuclei) inside larger touching blobs (cells), textured channels in [0, 1]."""
    rng = np.random.default_rng(seed)
    nuclei = np.zeros((size, size), np.int32)
    cells = np.zeros((size, size), np.int32)
    k = 0
    for cy in (22, 52, 78):
        for cx in (20, 48, 76):
            k += 1
            rr, cc = disk((cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)), 13 + rng.integers(0, 4),
                          shape=cells.shape)
            cells[rr, cc] = k  # later cells overwrite earlier ones: touching, irregular outlines
            rr, cc = ellipse(cy, cx, 5 + rng.integers(0, 4), 4 + rng.integers(0, 3), rotation=rng.random() * np.pi,
                             shape=cells.shape)
            nuclei[rr, cc] = k
    cells[nuclei > 0] = nuclei[nuclei > 0]
    seg = Segmentation(nuclei=nuclei, cells=cells, cytoplasm=np.where(nuclei > 0, 0, cells))
    yy, xx = np.mgrid[:size, :size]
    image = np.stack([
        0.15 * rng.random((size, size)) + 0.3 * (cells > 0) + 0.2 * np.sin(xx / (3 + c)) ** 2 + 0.1 * (nuclei > 0)
        for c in range(len(CHANNELS))]).astype(np.float32)
    return np.clip(image, 0, 1), seg


def _assert_equal(mine: dict, ref: dict) -> int:
    missing = sorted(set(mine) - set(ref))
    assert not missing, f"default features cp_measure does not produce under the same name: {missing[:5]}"
    for name, values in mine.items():
        # MassDisplacement is a difference of two ~50 px centroids that cp_measure sums in float32
        atol = 1e-4 if "MassDisplacement" in name else 1e-9
        np.testing.assert_allclose(values, ref[name], rtol=RTOL, atol=atol, equal_nan=True, err_msg=name)
    return len(mine)


def test_shape_intensity_correlation_equal_cp_measure():
    image, seg = _scene()
    ids = np.unique(seg.nuclei)[1:]
    mine = measure.default_features(image, seg.compartments(), CHANNELS, ids, texture_directions=())
    ref = measure.full_features(image, seg.compartments(), CHANNELS, ids, texture=False,
                                radial_distribution=False, radial_zernikes=False, granularity=False, zernike=False,
                                feret=False, correlation_manders_fold=False, correlation_rwc=False)
    assert _assert_equal(mine, ref) == 3 * (13 + 12 * 5 + 10)


def test_texture_equals_cp_measure_all_directions():
    """Sparse per-object co-occurrence Haralick == cp_measure's mahotas per object (cp_measure's texture is
    slow: one compartment and two channels keep this test short)."""
    image, seg = _scene(seed=3)
    ids = np.unique(seg.nuclei)[1:]
    compartments = {"Cytoplasm": seg.cytoplasm}
    mine = measure.default_features(image[:2], compartments, CHANNELS[:2], ids, texture_directions=(0, 1, 2, 3))
    mine = {k: v for k, v in mine.items() if "_Texture_" in k}
    ref = measure.full_features(image[:2], compartments, CHANNELS[:2], ids, intensity=False, sizeshape=False,
                                radial_distribution=False, radial_zernikes=False, granularity=False, zernike=False,
                                feret=False, correlation_pearson=False, correlation_manders_fold=False,
                                correlation_rwc=False)
    assert _assert_equal(mine, ref) == 7 * 4 * 2


def test_texture_nan_when_no_pixel_pairs_like_cp_measure():
    """An object thinner than the texture scale has no co-occurring pairs: NaN in both implementations."""
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 9] = 1            # 1-px wide vertical line: no horizontal pair at distance 3
    labels[2:8, 2:8] = 2
    rng = np.random.default_rng(1)
    pixels = rng.random((20, 20)).astype(np.float32)
    ids = np.array([1, 2])
    mine = measure.haralick(labels, measure.quantise_for_texture(pixels), ids, scale=3, direction=0)
    ref = measure.full_features(pixels[None], {"Cells": labels}, ("DNA",), ids, intensity=False,
                                granularity=False, radial_distribution=False, radial_zernikes=False,
                                sizeshape=False, zernike=False, feret=False)
    assert np.isnan(mine["Contrast"][0]) and np.isnan(ref["Cells_Texture_Contrast_DNA_3_00_256"][0])
    np.testing.assert_allclose(mine["Entropy"][1], ref["Cells_Texture_Entropy_DNA_3_00_256"][1], rtol=RTOL)


def test_missing_object_in_a_compartment_is_nan():
    """A cell whose nucleus fills it has an empty cytoplasm: its Cytoplasm features are NaN, not zero."""
    image, seg = _scene(seed=2)
    cyto = seg.cytoplasm.copy()
    cyto[cyto == 3] = 0
    ids = np.unique(seg.nuclei)[1:]
    feats = measure.default_features(image, {"Cytoplasm": cyto}, CHANNELS, ids)
    row = list(ids).index(3)
    assert np.isnan(feats["Cytoplasm_AreaShape_Area"][row])
    assert np.isnan(feats["Cytoplasm_Intensity_MeanIntensity_DNA"][row])
    assert np.isfinite(feats["Cytoplasm_Intensity_MeanIntensity_DNA"][row - 1])


@pytest.mark.parametrize("key,expected", [
    ("Area", "Cells_AreaShape_Area"),
    ("Intensity_MeanIntensity__ER", "Cells_Intensity_MeanIntensity_ER"),
    ("Contrast_3_00_256__ER", "Cells_Texture_Contrast_ER_3_00_256"),
    ("Granularity_2__ER", "Cells_Granularity_2_ER"),
    ("RadialDistribution_FracAtD_1of4__ER", "Cells_RadialDistribution_FracAtD_ER_1of4"),
    ("RadialDistribution_ZernikeMagnitude_2_0__ER", "Cells_RadialDistribution_ZernikeMagnitude_ER_2_0"),
    ("Correlation_Pearson__DNA__ER", "Cells_Correlation_Correlation_DNA_ER"),
    ("Correlation_Manders_1__DNA__ER", "Cells_Correlation_Manders_DNA_ER"),
    ("Correlation_Manders_2__DNA__ER", "Cells_Correlation_Manders_ER_DNA"),
])
def test_cellprofiler_names(key, expected):
    assert measure.cellprofiler_name("Cells", key) == expected


def test_default_names_are_jump_columns():
    """Every default feature is a column of a real JUMP well-level CellProfiler profile."""
    path = shared_path("data", "jump-metadata", "example_well_level_cellprofiler_profile__BR00121431_2wells.csv")
    with open(path) as fh:
        jump = set(next(csv.reader(fh)))
    names = feature_names(DEMO.features)
    unknown = [n for n in names if n not in jump]
    assert not unknown, unknown[:10]
    assert len(names) == 3 * (13 + 12 * 5 + 10 + 7 * 5)


def test_full_set_names_mostly_jump_columns():
    """The cp_measure set renamed: its per-channel groups land on JUMP's column names."""
    path = shared_path("data", "jump-metadata", "example_well_level_cellprofiler_profile__BR00121431_2wells.csv")
    with open(path) as fh:
        jump = set(next(csv.reader(fh)))
    names = feature_names(FeatureConfig(feature_set="full"))
    for group in ("Intensity", "Texture", "Granularity", "RadialDistribution_FracAtD", "Correlation_Correlation"):
        inside = [n for n in names if f"_{group}_" in n]
        assert inside and all(n in jump for n in inside), [n for n in inside if n not in jump][:5]


def test_cellprofiler_set_equals_cp_measure():
    """Every non-texture group of the `cellprofiler` set (intensity + location, shape, Zernike, granularity,
    radial distribution and its Zernikes, Pearson) == cp_measure's value for the same object, all three
    compartments and five channels; the set has 3,024 columns, each a cp_measure column."""
    image, seg = _scene(seed=1)
    ids = np.unique(seg.nuclei)[1:]
    groups = tuple(g for g in measure.CELLPROFILER_GROUPS if g != "texture")
    mine = measure.cellprofiler_features(image, seg.compartments(), CHANNELS, ids, groups=groups)
    ref = measure.full_features(image, seg.compartments(), CHANNELS, ids, texture=False, feret=False,
                                correlation_manders_fold=False, correlation_rwc=False)
    assert _assert_equal(mine, ref) == 3 * (13 + 30 + 5 * (19 + 16 + 12 + 60) + 10)
    assert len(feature_names(FeatureConfig(feature_set="cellprofiler"))) == 3024


def test_cellprofiler_spatial_groups_with_absent_and_tiny_objects():
    """Objects absent from a compartment are NaN rows; a 1-px object (0-radius enclosing circle) and a 12 px
    image (granularity on 3 x 3 subsampled pixels) give cp_measure's values."""
    labels = np.zeros((12, 12), np.int32)
    labels[2:9, 2:8] = 4
    labels[10, 10] = 7
    rng = np.random.default_rng(5)
    image = (0.1 + 0.8 * rng.random((2, 12, 12))).astype(np.float32)
    ids = np.array([4, 5, 7])
    mine = measure.cellprofiler_features(image, {"Cells": labels}, CHANNELS[:2], ids,
                                         groups=("granularity", "radial", "zernike"))
    ref = measure.full_features(image, {"Cells": labels}, CHANNELS[:2], ids, intensity=False, texture=False,
                                sizeshape=False, feret=False, correlation_pearson=False,
                                correlation_manders_fold=False, correlation_rwc=False)
    assert np.isnan(mine["Cells_Granularity_1_DNA"][1]) and np.isnan(mine["Cells_AreaShape_Zernike_0_0"][1])
    _assert_equal(mine, ref)


@pytest.mark.parametrize("scale", [5, 10])
def test_texture_scales_equal_cp_measure(scale):
    """The JUMP texture scales 5 and 10 (the set's other scale, 3, is checked above), all four directions."""
    image, seg = _scene(seed=4)
    ids = np.unique(seg.nuclei)[1:]
    compartments = {"Cells": seg.cells}
    mine = measure.cellprofiler_features(image[:1], compartments, CHANNELS[:1], ids, texture_scales=(scale,),
                                         groups=("texture",))
    ref = measure.full_features(image[:1], compartments, CHANNELS[:1], ids, texture_params={"scale": scale},
                                intensity=False, sizeshape=False, radial_distribution=False, radial_zernikes=False,
                                granularity=False, zernike=False, feret=False)
    assert _assert_equal(mine, ref) == 7 * 4
