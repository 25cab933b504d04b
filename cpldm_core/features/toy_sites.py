"""Toy Cell Painting sites with known truth (cell count, nuclear size), for tests and benchmarks of the profile stage.

The full simulator (``cpldm_core.simulate``) renders whole plates with confounders; this draws one site from
the same ingredients (round nuclei, cytoplasm blobs around them, optics blur, background, noise) with the
truth set directly, so segmentation and features can be checked against it.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

#: uint16 full scale of the TIFFs.
UINT16_MAX = 65535
#: Nuclei may touch (centres >= 1.8 radii apart) so declumping is exercised, but never overlap by more.
MIN_CENTRE_DISTANCE_RADII = 1.8


def toy_site(n_cells: int, nucleus_radius: float, size: int = 96, seed: int = 0) -> np.ndarray:
    """A (5, H, W) uint16 site, channels (DNA, ER, RNA, AGP, Mito), with ``n_cells`` round nuclei of
    ``nucleus_radius`` px inside Gaussian cytoplasm blobs (sd 1.6 radii), blurred (0.8 px), plus background
    (0.03) and Gaussian noise (sd 0.01) in [0, 1] intensity units."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    centres: list[np.ndarray] = []
    margin = nucleus_radius + 2
    attempts = 0
    while len(centres) < n_cells:
        attempts += 1
        if attempts > 100_000:
            raise ValueError(f"cannot place {n_cells} nuclei of radius {nucleus_radius} in {size}x{size} px")
        c = rng.uniform(margin, size - margin, 2)
        if all(np.hypot(*(c - o)) >= MIN_CENTRE_DISTANCE_RADII * nucleus_radius for o in centres):
            centres.append(c)
    dna = np.zeros((size, size), np.float32)
    cyto = np.zeros((size, size), np.float32)
    for cy, cx in centres:
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dna += (r2 <= nucleus_radius ** 2) * rng.uniform(0.5, 0.7)
        cyto += np.exp(-r2 / (2 * (1.6 * nucleus_radius) ** 2)) * 0.4
    image = np.stack([dna, cyto * 0.8, cyto * 0.6, cyto, cyto * 0.7])
    image = ndi.gaussian_filter(image, (0, 0.8, 0.8)) + 0.03
    image = image + rng.normal(0, 0.01, image.shape)
    return (np.clip(image, 0, 1) * UINT16_MAX).astype(np.uint16)
