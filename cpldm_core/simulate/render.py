"""Cell-Painting-like rendering of one five-channel site (vectorised numpy/scipy; pure, deterministic).

A field of view holds cells whose bodies are the Voronoi regions of their centres clipped to an ellipse, so
neighbours touch. Per cell the phenotype vector (compound truth + per-cell noise) sets nucleus size and
intensity, chromatin texture, cell size and elongation, and per-organelle intensity and texture:

- DNA (Hoechst): nuclei with chromatin texture, darker nucleoli.
- ER (concanavalin A): reticular mesh (zero-crossings of band-pass noise), brighter around the nucleus.
- RNA (SYTO 14): bright nucleoli, weak nucleoplasm, diffuse cytoplasm fading outwards.
- AGP (phalloidin/WGA): membranes where cells touch and at free edges, faint actin texture, a Golgi blob.
- Mito (MitoTracker): puncta scattered through the cytoplasm, denser near the nucleus.

Then the confounders' optics: per-channel gain (source, batch drift, plate edge, within-plate gradient), an
off-centre vignetting field, source blur and background; Poisson shot noise (``photons_per_unit``) and
Gaussian read noise; conversion to 16-bit counts. :mod:`cpldm_core.simulate.oracle` feeds it a World's
mechanisms for one condition.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cpldm_core.simulate.world import PHENOTYPE_GAIN, PHENOTYPES

#: Digital counts per intensity unit. Typical foreground is 0.5-2 units, so 12,000 keeps the brightest
#: nuclei below the 16-bit ceiling (65,535) while background stays a few hundred counts, as in JUMP TIFFs.
COUNTS_PER_UNIT = 12_000.0
UINT16_MAX = 65_535
#: Mean brightness of each channel (DNA, ER, RNA, AGP, Mito) before confounders, intensity units.
CHANNEL_BRIGHTNESS = np.array([1.4, 0.8, 0.7, 0.7, 0.9])
#: Nucleus radius / cell radius for an untreated cell.
NUCLEUS_FRACTION = 0.45
#: Reach of a cell body (ellipse radius) relative to the reference radius (half the cell diameter).
CELL_REACH = 1.3
#: Base cell elongation (major/minor axis ratio, log-normal around it).
BASE_ELONGATION = 1.15
#: Nucleoli per nucleus (Poisson mean, +1) and Mito puncta per cell at the reference size.
NUCLEOLI_PER_NUCLEUS = 2.0
MITO_PUNCTA_PER_CELL = 30.0
#: Minimum centre distance between cells, in cell diameters (cells may still touch and squeeze).
MIN_CENTRE_DISTANCE = 0.7

_DIM = {name: j for j, name in enumerate(PHENOTYPES)}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma, unit: bool = True) -> np.ndarray:
    """Gaussian-filtered white noise; with ``unit`` rescaled to mean 0, SD 1. (H, W) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    if unit:
        field /= field.std() + 1e-8
    return field


def _splat(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, weights: np.ndarray,
           sigma: float) -> np.ndarray:
    """Sum of Gaussian spots of SD ``sigma`` px with the given integrated weights. (H, W) float32."""
    img = np.zeros(shape, dtype=np.float32)
    yi, xi = np.round(ys).astype(int), np.round(xs).astype(int)
    ok = (yi >= 0) & (yi < shape[0]) & (xi >= 0) & (xi < shape[1])
    np.add.at(img, (yi[ok], xi[ok]), weights[ok].astype(np.float32))
    return ndimage.gaussian_filter(img, sigma, mode="constant") * np.float32(2 * np.pi * sigma ** 2)


def _place_cells(rng: np.random.Generator, n: int, size: int, pad: float, min_dist: float) -> np.ndarray:
    """(n', 2) float centres (y, x) in [-pad, size+pad), dart-throwing with a minimum distance."""
    cand = rng.uniform(-pad, size + pad, size=(max(4 * n, 8), 2))
    conflict = np.sum((cand[:, None, :] - cand[None, :, :]) ** 2, axis=-1) < min_dist ** 2
    blocked = np.zeros(len(cand), dtype=bool)
    kept: list[int] = []
    for i in range(len(cand)):
        if blocked[i]:
            continue
        kept.append(i)
        if len(kept) == n:
            break
        blocked |= conflict[i]
    return cand[kept]


def render_site(rng: np.random.Generator, phenotype: np.ndarray, *, image_size: int, cell_diameter_px: float,
                cells_per_site: float, cell_variability: float, photons_per_unit: float,
                gain: np.ndarray, blur: float, background: float, read_noise: float,
                illum_amplitude: float, illum_centre: tuple[float, float], cell_density: float,
                cell_size: float, return_truth: bool = False):
    """Render one site.

    Args:
        rng: the site's own random stream (determinism: same stream -> same pixels).
        phenotype: (len(PHENOTYPES),) float true phenotype shift of the well's compound (standard units).
        image_size: field side in pixels.
        cell_diameter_px: reference cell diameter in pixels.
        cells_per_site: expected cells per field at density 1.
        cell_variability: SD of per-cell phenotype noise (standard units).
        photons_per_unit: photons per intensity unit (Poisson shot noise).
        gain: (5,) per-channel multiplicative gain (source gain x batch drift x plate edge x gradient at the
            well: :meth:`World.channel_gain`), channel order DNA..Mito.
        blur: Gaussian PSF SD in pixels.
        background, read_noise: additive background and Gaussian read-noise SD, intensity units.
        illum_amplitude, illum_centre: vignetting depth at the corner and centre offset (fractions of field).
        cell_density, cell_size: C->P multipliers of cell count (incl. plate edge and gradient at the well:
            :meth:`World.cell_density`) and cell radius.
        return_truth: also return per-site truth (cell count, mean nuclear area in px).
    Returns:
        (5, image_size, image_size) uint16 image in channel order (DNA, ER, RNA, AGP, Mito); with
        ``return_truth`` a tuple (image, dict(n_cells=int, nucleus_area_px=float)).
    """
    size = int(image_size)
    shape = (size, size)
    z = np.asarray(phenotype, dtype=np.float64)
    g = {name: PHENOTYPE_GAIN[name] for name in PHENOTYPES}
    scale = cell_diameter_px / 30.0  # texture scales follow magnification

    # ---- cells: count, centres, per-cell phenotype (compound shift + cell-to-cell noise)
    expected = cells_per_site * cell_density * np.exp(g["CellCount"] * z[_DIM["CellCount"]])
    n_target = max(int(rng.poisson(expected)), 1)
    radius0 = 0.5 * cell_diameter_px * cell_size
    pad = radius0
    centres = _place_cells(rng, n_target, size, pad, MIN_CENTRE_DISTANCE * 2 * radius0).astype(np.float32)
    n = len(centres)
    zc = z[None, :] + cell_variability * rng.standard_normal((n, len(PHENOTYPES)))

    def per_cell(name: str) -> np.ndarray:
        return np.exp(g[name] * zc[:, _DIM[name]]).astype(np.float32)

    # a cell body reaches further than half the typical spacing, so the Voronoi cut makes neighbours touch
    cell_r = CELL_REACH * radius0 * np.sqrt(per_cell("CellArea"))
    nuc_r = NUCLEUS_FRACTION * radius0 * np.sqrt(per_cell("NucleusArea"))
    nuc_r = np.minimum(nuc_r, 0.85 * cell_r)
    elong = BASE_ELONGATION * per_cell("CellElongation") * np.exp(0.1 * rng.standard_normal(n))
    theta = rng.uniform(0, np.pi, n).astype(np.float32)

    # ---- pixel -> nearest cell (Voronoi: neighbours touch), distance to the second nearest (membranes)
    yy, xx, pix = _pixel_grid(size)
    k = 2 if n > 1 else 1
    dist, idx = cKDTree(centres).query(pix, k=k)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
        dist = np.concatenate([dist, np.full_like(dist, 1e6)], axis=1)
    label = idx[:, 0].reshape(shape).astype(np.int32)
    gap = (dist[:, 1] - dist[:, 0]).reshape(shape).astype(np.float32)   # 0 on the Voronoi boundary
    dy = yy - centres[label, 0]
    dx = xx - centres[label, 1]
    ct, st = np.cos(theta)[label], np.sin(theta)[label]
    a = np.sqrt(elong)[label]
    u = (dx * ct + dy * st) / a
    v = (-dx * st + dy * ct) * a
    rho = np.sqrt(u ** 2 + v ** 2)                           # elliptical radius, px
    cell_r_map, nuc_r_map = cell_r[label], nuc_r[label]      # gathered once: per-pixel lookups are costly
    outline = 1.0 + 0.12 * _smooth_noise(rng, shape, 3.0 * scale)
    cell = _sigmoid((cell_r_map * outline - rho) / (0.8 * scale))
    cell *= _sigmoid((gap - 0.5) / 0.5)                      # a dark seam between touching cells
    nuc_rho = np.sqrt((u * 0.9) ** 2 + (v / 0.9) ** 2)       # nuclei slightly rounder than cells
    nucleus = _sigmoid((nuc_r_map * (1.0 + 0.05 * outline) - nuc_rho) / (0.7 * scale))
    cyto = np.clip(cell - nucleus, 0.0, 1.0)

    # ---- nucleoli (RNA bright, DNA dark): a few spots inside each nucleus
    n_nucleoli = rng.poisson(NUCLEOLI_PER_NUCLEUS * per_cell("Nucleoli")) + 1
    owner = np.repeat(np.arange(n), n_nucleoli)
    ang = rng.uniform(0, 2 * np.pi, len(owner))
    rad = 0.45 * nuc_r[owner] * np.sqrt(rng.uniform(0, 1, len(owner)))
    nucleoli = _splat(shape, centres[owner, 0] + rad * np.sin(ang), centres[owner, 1] + rad * np.cos(ang),
                      np.ones(len(owner)), sigma=1.1 * scale)
    nucleoli = np.clip(nucleoli / (nucleoli.max() + 1e-8), 0, 1) * nucleus

    # ---- DNA: chromatin texture; intensity per cell
    dna_int = per_cell("NucleusIntensity")[label]
    tex = 0.25 * per_cell("NucleusTexture")[label]
    chromatin = _smooth_noise(rng, shape, 0.9 * scale)
    dna = nucleus * dna_int * np.clip(1.0 + tex * chromatin, 0.2, None) * (1.0 - 0.5 * nucleoli)

    # ---- ER: reticular mesh from zero-crossings of band-pass noise, brighter around the nucleus
    white = rng.standard_normal(shape, dtype=np.float32)
    band = ndimage.gaussian_filter(white, 1.2 * scale, mode="wrap") - ndimage.gaussian_filter(
        white, 3.0 * scale, mode="wrap")
    mesh = np.exp(-(band / (0.35 * band.std() + 1e-8)) ** 2)
    contrast = np.clip(0.55 * per_cell("ERTexture"), 0.0, 0.95)[label]
    perinuclear = np.exp(-np.clip(rho - nuc_r_map, 0, None) / (0.6 * cell_r_map))
    envelope = np.exp(-((nuc_rho - nuc_r_map) / (1.2 * scale)) ** 2)
    er = (cyto * perinuclear * (1.0 - contrast + contrast * mesh) + 0.5 * envelope * cell)
    er *= per_cell("ERIntensity")[label]

    # ---- RNA: nucleoli + weak nucleoplasm + cytoplasm fading outwards
    rna = (1.6 * nucleoli + 0.25 * nucleus + 0.5 * cyto * np.exp(-rho / cell_r_map))
    rna *= per_cell("RNAIntensity")[label] * (1.0 + 0.15 * _smooth_noise(rng, shape, 1.0 * scale))

    # ---- AGP: membranes (touching and free edges), faint actin texture, Golgi next to the nucleus
    membrane_w = 1.0 * scale
    touching = np.exp(-(gap / (2 * membrane_w)) ** 2)
    free_edge = np.exp(-((rho - cell_r_map * outline) / membrane_w) ** 2)
    edges = np.clip(touching + free_edge, 0, 1) * _sigmoid((cell_r_map * outline + 2 * membrane_w - rho)
                                                           / (0.8 * scale))
    # stress fibres run along each cell's long axis: blend a horizontal and a vertical streak field by angle
    along_x = _smooth_noise(rng, shape, (0.6 * scale, 3.0 * scale))
    along_y = _smooth_noise(rng, shape, (3.0 * scale, 0.6 * scale))
    actin = np.clip(1.0 + 0.3 * (ct ** 2 * along_x + st ** 2 * along_y), 0, None)
    g_ang = rng.uniform(0, 2 * np.pi, n)
    golgi = _splat(shape, centres[:, 0] + 1.15 * nuc_r * np.sin(g_ang), centres[:, 1] + 1.15 * nuc_r * np.cos(g_ang),
                   np.full(n, 1.0), sigma=0.35 * radius0 * NUCLEUS_FRACTION)
    golgi = golgi / (golgi.max() + 1e-8) * cell
    membrane_strength = np.clip(0.8 * per_cell("AGPMembrane"), 0.1, 3.0)[label]
    agp = (membrane_strength * edges + 0.25 * cyto * actin + 0.6 * golgi) * per_cell("AGPIntensity")[label]

    # ---- Mito: puncta through the cytoplasm, denser near the nucleus; granularity = more, finer puncta
    granularity = per_cell("MitoGranularity")
    n_puncta = rng.poisson(MITO_PUNCTA_PER_CELL * (cell_r / radius0) ** 2 * granularity)
    owner = np.repeat(np.arange(n), n_puncta)
    ang = rng.uniform(0, 2 * np.pi, len(owner))
    frac = nuc_r[owner] / cell_r[owner]
    rad = cell_r[owner] * (frac + (1 - frac) * rng.beta(1.2, 2.0, len(owner)))
    el = np.sqrt(elong[owner])
    py = centres[owner, 0] + rad * (np.sin(ang) / el * np.cos(theta[owner]) + np.cos(ang) * el * np.sin(theta[owner]))
    px = centres[owner, 1] + rad * (np.cos(ang) * el * np.cos(theta[owner]) - np.sin(ang) / el * np.sin(theta[owner]))
    weights = per_cell("MitoIntensity")[owner] / np.maximum(granularity[owner], 0.2)
    puncta = _splat(shape, py, px, weights, sigma=0.9 * scale)
    mito = (4.0 * puncta / (np.pi * (0.9 * scale) ** 2 * 8.0) + 0.15 * cyto * per_cell("MitoIntensity")[label])
    mito *= cell

    # ---- optics (C->O): illumination field, gain, blur, background, shot + read noise, 16-bit
    cy, cx = (0.5 + illum_centre[1]) * size, (0.5 + illum_centre[0]) * size
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * size ** 2)
    field = np.clip(1.0 - illum_amplitude * r2, 0.05, None)
    stack = np.stack([dna, er, rna, agp, mito]).astype(np.float32)
    stack *= (CHANNEL_BRIGHTNESS * np.asarray(gain))[:, None, None].astype(np.float32)
    stack *= field[None].astype(np.float32)
    if blur > 0:
        stack = ndimage.gaussian_filter(stack, (0, blur, blur), mode="nearest")
    stack += np.float32(background)
    # Poisson-Gaussian noise (Foi et al. 2008): shot noise with variance = mean photons, in its Gaussian
    # approximation (>= ~100 photons per pixel here, where it matches Poisson; 5x faster than exact draws),
    # plus signal-independent read noise
    stack = np.clip(stack, 0, None)
    shot_sd = np.sqrt(stack / np.float32(photons_per_unit))
    noise = rng.standard_normal(stack.shape, dtype=np.float32)
    signal = stack + shot_sd * noise + np.float32(read_noise) * rng.standard_normal(stack.shape, dtype=np.float32)
    image = np.clip(np.round(signal * COUNTS_PER_UNIT), 0, UINT16_MAX).astype(np.uint16)
    if not return_truth:
        return image
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < size) & (centres[:, 1] >= 0) & (centres[:, 1] < size)
    return image, {"n_cells": int(inside.sum()), "nucleus_area_px": float(np.mean(np.pi * nuc_r ** 2))}


@lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column index grids (H, W) float32 and the (H*W, 2) float64 pixel list (cached per size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    pix = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    for a in (yy, xx, pix):
        a.setflags(write=False)
    return yy, xx, pix


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ---------------------------------------------------------------------------------------------- preview
#: False-colour mixing of (DNA, ER, RNA, AGP, Mito) into RGB, the usual Cell Painting composite:
#: DNA blue, ER green, RNA cyan-ish, AGP red, Mito magenta-ish.
FALSE_COLOUR = np.array([
    [0.0, 0.0, 1.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.45, 0.45],
    [1.0, 0.0, 0.0],
    [0.6, 0.0, 0.6],
])


def false_colour(image: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """(5, H, W) uint16 -> (H, W, 3) uint8 composite, each channel scaled to its own ``percentile``."""
    x = image.astype(np.float32)
    lo = np.percentile(x, 1, axis=(1, 2), keepdims=True)
    hi = np.percentile(x, percentile, axis=(1, 2), keepdims=True)
    x = np.clip((x - lo) / np.maximum(hi - lo, 1.0), 0, 1)
    rgb = np.einsum("chw,ck->hwk", x, FALSE_COLOUR)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def montage(tiles: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Grid of (H, W, 3) uint8 tiles (rows of equal length; ``None`` = blank) -> one (H', W', 3) uint8."""
    first = next(t for row in tiles for t in row if t is not None)
    h, w, _ = first.shape
    n_rows, n_cols = len(tiles), max(len(r) for r in tiles)
    out = np.full((n_rows * (h + gap) + gap, n_cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if tile is not None:
                out[gap + i * (h + gap): gap + i * (h + gap) + h, gap + j * (w + gap): gap + j * (w + gap) + w] = tile
    return out
