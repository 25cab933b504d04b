"""Segmentation recovers known truth: nuclear size and cell density on simulated-like sites, and CellProfiler's own
nuclei count on a real JUMP pilot site."""
from __future__ import annotations


import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.stats import spearmanr

from conftest import shared_path
from cpldm_core.features import profile_site
from cpldm_core.features.config import JUMP, TINY
from cpldm_core.features.segmentation import UINT16_MAX, qc_flags, segment, to_float
from cpldm_core.features.toy_sites import toy_site as simulated_site


def test_nuclear_area_ranks_with_true_size():
    radii = [2.5, 3.5, 4.5, 5.5]
    areas = []
    for k, r in enumerate(radii):
        prof = profile_site(simulated_site(10, r, seed=k), TINY)
        areas.append(float(np.median(prof.cells[:, prof.names.index("Nuclei_AreaShape_Area")])))
    assert spearmanr(radii, areas).statistic == 1.0
    # and the areas are the disks' areas to within the blur halo
    np.testing.assert_allclose(areas, np.pi * np.square(radii), rtol=0.35)


def test_cell_count_follows_true_density():
    truth = [3, 8, 16, 28]
    found = [profile_site(simulated_site(n, 3.5, seed=10 + n), TINY).count for n in truth]
    assert spearmanr(truth, found).statistic == 1.0
    np.testing.assert_allclose(found, truth, rtol=0.2, atol=1)


def test_compartments_are_consistent():
    raw = simulated_site(12, 4.0, seed=3)
    seg = segment(to_float(raw), TINY.segmentation)
    nuclei_ids = set(np.unique(seg.nuclei)) - {0}
    assert set(np.unique(seg.cells)) - {0} == nuclei_ids                    # one cell per nucleus, same number
    assert np.all(seg.cells[seg.nuclei > 0] == seg.nuclei[seg.nuclei > 0])  # each cell holds its nucleus
    assert not np.any((seg.cytoplasm > 0) & (seg.nuclei > 0))               # cytoplasm = cell minus nucleus
    assert np.all((seg.cytoplasm > 0) | (seg.nuclei > 0) | (seg.cells == 0))
    assert (seg.cells > 0).sum() > 1.5 * (seg.nuclei > 0).sum()              # cells extend beyond nuclei


def test_quality_flags():
    raw = simulated_site(10, 4.0, seed=4)
    image = to_float(raw)
    assert qc_flags(raw, image, 10, TINY.qc) == []
    blurred = ndi.gaussian_filter(image, (0, 6, 6))
    assert "blur" in qc_flags(raw, blurred, 10, TINY.qc)
    saturated = raw.copy()
    saturated[2, :20] = UINT16_MAX
    assert "saturation" in qc_flags(saturated, image, 10, TINY.qc)
    assert "few_cells" in qc_flags(raw, image, TINY.qc.min_cells - 1, TINY.qc)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="channel"):
        profile_site(np.zeros((3, 32, 32), np.uint16), TINY)


def _outline_regions(path) -> int:
    """Objects in a CellProfiler outline PNG: connected regions enclosed by outline pixels (not the background)."""
    import skimage.io

    outline = skimage.io.imread(path) > 0
    regions, n = ndi.label(~outline)
    sizes = np.bincount(regions.ravel())[1:]
    # the background is the largest region; specks between touching outlines are not nuclei
    return int(((sizes >= 50) & (sizes < sizes.max())).sum())


def test_nuclei_count_close_to_cellprofiler_on_jump_pilot_site():
    import tifffile

    folder = shared_path("data", "images", "cpg0000_jump_pilot_BR00117006_A01_site1")
    expected = _outline_regions(folder / "r01c01f01p01-ch5sk1fk1fl1_nuclei_outlines.png")
    dna = tifffile.imread(folder / "r01c01f01p01-ch5sk1fk1fl1.tiff")
    from cpldm_core.features.segmentation import segment_nuclei
    found = int(segment_nuclei(dna.astype(np.float32) / UINT16_MAX, JUMP.segmentation).max())
    assert expected > 100
    assert abs(found - expected) <= 0.1 * expected, (found, expected)
