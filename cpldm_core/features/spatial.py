"""Granularity, radial distribution and Zernike features, vectorised by computing shared work once.

cp_measure (like CellProfiler) measures every (compartment, channel) pair from scratch, yet most of the work of
these groups depends on only one of the two:

- **Granularity**: the image work (subsample, tophat background removal, 16 erosion + reconstruction steps)
  depends only on the channel -> once per channel, the reconstructions on uint16 value ranks (a linear radix sort
  instead of two float sorts per step); the per-object mean of each step restored to full scale is a sparse
  (objects x subsampled pixels) bilinear operator that depends only on the labels -> once per compartment,
  applied to all 16 steps in one sparse product.
- **Radial distribution**: the geometry (distance to the edge, object centres, distance propagated from the
  centre, ring and wedge of every pixel) depends only on the labels -> once per compartment, object by object on
  its bounding box; per channel only weighted bincounts remain.
- **Zernike**: the Zernike polynomials of every labelled pixel (on its object's minimum enclosing circle) depend
  only on the labels -> once per compartment; the shape moments (``AreaShape_Zernike``) and each channel's
  intensity moments (``RadialDistribution_Zernike*``) are weighted sums of them.

The label-only and image-only steps call the same centrosome / scikit-image / scipy routines with the same
parameters as cp_measure 0.3 (``measuregranularity``, ``measureobjectintensitydistribution``, ``utils
._zernike_scores``), so values equal cp_measure's (tests/test_features_measure.py). Keys are cp_measure's
(``Granularity_3``, ``RadialDistribution_FracAtD_1of4``, ``Zernike_2_0``); :func:`measure.cellprofiler_name`
turns them into CellProfiler columns.

Labels are (H, W) int, background 0, any object numbers; results are (N,) float64 rows in the order of ``ids``,
NaN for an object absent from the labels.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse
import skimage.morphology

#: CellProfiler MeasureGranularity defaults (and cp_measure's): subsampling for the spectrum and for the
#: background, structuring-element radius (px after subsampling), spectrum length.
GRANULARITY_SUBSAMPLE = 0.25
GRANULARITY_BACKGROUND_SUBSAMPLE = 0.25
GRANULARITY_ELEMENT_SIZE = 10
GRANULARITY_SPECTRUM_LENGTH = 16
#: MeasureObjectIntensityDistribution defaults: 4 scaled rings, Zernike moments up to degree 9 (30 moments).
RADIAL_BIN_COUNT = 4
ZERNIKE_DEGREE = 9
#: Bins of the dense per-block sum that builds the granularity operator (32 MB of float64).
_OPERATOR_BINS = 2 ** 22
#: Pixels per block when Zernike moments are summed (the block's complex basis is 16 MB).
_ZERNIKE_BLOCK = 32768


class Objects:
    """One compartment's labels relabelled 1..n in ascending object number (cp_measure's ``sanitize``), and
    where each requested id lands. ``clean`` (H, W) int64, ``n`` objects, ``row`` (N,) int64 index into 0..n-1
    for each of ``ids`` (-1 when absent)."""

    def __init__(self, labels: np.ndarray, ids: np.ndarray):
        labels = np.asarray(labels)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
        present = present[present > 0]
        lut = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
        lut[present] = np.arange(1, len(present) + 1)
        self.clean = lut[labels]
        self.n = len(present)
        ids = np.asarray(ids, dtype=np.int64)
        self.row = np.full(len(ids), -1, np.int64)
        if len(present):
            pos = np.minimum(np.searchsorted(present, ids), len(present) - 1)
            self.row = np.where(present[pos] == ids, pos, -1)

    def pick(self, values: np.ndarray) -> np.ndarray:
        """(n,) per-object values -> (N,) rows of ``ids`` (NaN where absent)."""
        out = np.full(len(self.row), np.nan)
        ok = self.row >= 0
        out[ok] = np.asarray(values, dtype=np.float64)[self.row[ok]]
        return out


# ---------------------------------------------------------------------------------------------- Granularity
def granular_spectrum(pixels: np.ndarray) -> np.ndarray | None:
    """The image side of granularity: (steps, h, w) reconstructions of the background-subtracted, subsampled
    channel after 1..16 erosions (cp_measure ``get_granularity`` lines before the per-object means); ``pixels``
    (H, W) float32. None when subsampling leaves fewer than 2 pixels on an axis (cp_measure then gives NaN)."""
    orig_shape = np.array(pixels.shape)
    new_shape = (orig_shape * GRANULARITY_SUBSAMPLE).astype(int)
    if (new_shape < 2).any():
        return None
    i, j = np.mgrid[0:new_shape[0], 0:new_shape[1]].astype(float) / GRANULARITY_SUBSAMPLE
    pixels = ndi.map_coordinates(pixels, (i, j), order=1)
    back_shape = new_shape * GRANULARITY_BACKGROUND_SUBSAMPLE
    i, j = np.mgrid[0:back_shape[0], 0:back_shape[1]].astype(float) / GRANULARITY_BACKGROUND_SUBSAMPLE
    back = ndi.map_coordinates(pixels, (i, j), order=1)
    footprint = skimage.morphology.disk(GRANULARITY_ELEMENT_SIZE, dtype=bool)
    back = skimage.morphology.dilation(skimage.morphology.erosion(back, footprint=footprint), footprint=footprint)
    i, j = np.mgrid[0:new_shape[0], 0:new_shape[1]].astype(float)
    i *= (back_shape[0] - 1) / (new_shape[0] - 1)
    j *= (back_shape[1] - 1) / (new_shape[1] - 1)
    pixels = pixels - ndi.map_coordinates(back, (i, j), order=1)
    pixels[pixels < 0] = 0
    return _erosion_reconstructions(pixels, GRANULARITY_SPECTRUM_LENGTH)


def _erosion_reconstructions(pixels: np.ndarray, count: int) -> np.ndarray:
    """(count, h, w): grey reconstruction by dilation under ``pixels`` of its 1..count-fold erosions (cross
    footprint), = ``skimage.morphology.reconstruction(erosion^k(pixels), pixels)``.

    Erosion and reconstruction only compare values, so they commute with the rank transform: the chain runs on
    uint16 ranks of ``pixels``' distinct values (fewer than 65,536 on a 1080 px site subsampled 4x), where the
    reconstruction's pixel sort is numpy's linear radix sort instead of the two float sorts scikit-image does per
    call (~75% of granularity's cost); same values. Otherwise scikit-image's own function.
    """
    disk1 = skimage.morphology.disk(1, dtype=bool)
    values = np.unique(pixels)
    try:
        from skimage.morphology._grayreconstruct import reconstruction_loop
    except ImportError:  # private in scikit-image: fall back to the public function
        reconstruction_loop = None
    out = np.empty((count, *pixels.shape), dtype=np.float64)
    if reconstruction_loop is None or len(values) > np.iinfo(np.uint16).max + 1:
        ero = pixels.copy()
        for k in range(count):
            ero = skimage.morphology.erosion(ero, footprint=disk1)
            out[k] = skimage.morphology.reconstruction(ero, pixels, footprint=disk1)
        return out
    rank = np.searchsorted(values, pixels).astype(np.uint16)
    h, w = rank.shape
    big_h, big_w = h + 2, w + 2  # scikit-image pads by the footprint radius
    neighbours = np.array([-big_w, -1, 1, big_w], np.int32)  # the cross footprint without its centre
    ero = rank
    for k in range(count):
        ero = skimage.morphology.erosion(ero, footprint=disk1)
        images = np.full((2, big_h, big_w), ero.min(), np.uint16)
        images[0, 1:-1, 1:-1] = ero
        images[1, 1:-1, 1:-1] = rank
        flat = images.ravel()
        order = np.argsort(flat, kind="stable").astype(np.int32)[::-1]  # brightest first (dilation)
        prev = np.full(flat.size, -1, np.int32)
        nxt = np.full(flat.size, -1, np.int32)
        prev[order[1:]] = order[:-1]
        nxt[order[:-1]] = order[1:]
        value_rank = flat.astype(np.uint32)
        reconstruction_loop(value_rank, prev, nxt, neighbours, order[0], big_h * big_w)
        out[k] = values[value_rank[:big_h * big_w].reshape(big_h, big_w)[1:-1, 1:-1]]
    return out


def upsample_mean_operator(objects: Objects, orig_shape, new_shape) -> scipy.sparse.csr_matrix:
    """(n, h*w) sparse operator: row L x a subsampled image = object L's sum of the bilinear restoration of that
    image to full scale (map_coordinates order 1, zero outside the grid), as cp_measure's fused operator."""
    orig_shape, new_shape = np.asarray(orig_shape), np.asarray(new_shape)
    flat = objects.clean.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg] - 1
    r, c = np.divmod(fg, orig_shape[1])
    r = r * (float(new_shape[0] - 1) / float(orig_shape[0] - 1))
    c = c * (float(new_shape[1] - 1) / float(orig_shape[1] - 1))
    inside = (r >= 0) & (r <= new_shape[0] - 1) & (c >= 0) & (c <= new_shape[1] - 1)
    r, c, lab = r[inside], c[inside], lab[inside]
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = r - r0, c - c0
    r1, c1 = np.minimum(r0 + 1, new_shape[0] - 1), np.minimum(c0 + 1, new_shape[1] - 1)
    w = int(new_shape[1])
    n_down = int(new_shape[0]) * w
    cols = np.concatenate([r0 * w + c0, r0 * w + c1, r1 * w + c0, r1 * w + c1])
    weights = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc])
    rows = np.tile(lab, 4)
    # summing the ~4 x pixels duplicate (object, subsampled pixel) entries with a dense bincount over blocks of
    # objects gives the CSR arrays in order, ~5x faster than scipy's COO -> CSR (a sort)
    block = max(1, _OPERATOR_BINS // n_down)
    data, indices = [], []
    for first in range(0, objects.n, block):
        sel = (rows >= first) & (rows < first + block)
        dense = np.bincount((rows[sel] - first) * n_down + cols[sel], weights=weights[sel],
                            minlength=min(block, objects.n - first) * n_down)
        nz = np.flatnonzero(dense)
        data.append(dense[nz])
        indices.append(nz + first * n_down)
    flat = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(flat // n_down, minlength=objects.n))])
    return scipy.sparse.csr_matrix((np.concatenate(data) if data else np.zeros(0), flat % n_down, indptr),
                                   shape=(objects.n, n_down))


def granularity(objects: Objects, pixels: np.ndarray, steps: np.ndarray | None,
                operator: scipy.sparse.csr_matrix | None = None) -> dict[str, np.ndarray]:
    """``Granularity_1..16`` of one channel in one compartment, each (N,) float64: the % of the object's mean
    intensity removed by each erosion step. ``steps`` from :func:`granular_spectrum` of ``pixels`` (shared by
    compartments); ``operator`` from :func:`upsample_mean_operator` (shared by channels; built when None)."""
    names = [f"Granularity_{k}" for k in range(1, GRANULARITY_SPECTRUM_LENGTH + 1)]
    if steps is None or objects.n == 0:
        return {name: np.full(len(objects.row), np.nan) for name in names}
    if operator is None:
        operator = upsample_mean_operator(objects, pixels.shape, steps.shape[1:])
    counts = np.bincount(objects.clean.ravel(), minlength=objects.n + 1)[1:].astype(np.float64)
    current = np.bincount(objects.clean.ravel(), weights=pixels.ravel(), minlength=objects.n + 1)[1:] / counts
    start = np.maximum(current, np.finfo(float).eps)
    means = (operator @ steps.reshape(len(steps), -1).T) / counts[:, None]  # (n, steps)
    previous = np.column_stack([current, means[:, :-1]])
    spectrum = (previous - means) * 100 / start[:, None]
    return {name: objects.pick(spectrum[:, k]) for k, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------- Radial distribution
class RadialGeometry:
    """Label-only part of CellProfiler's MeasureObjectIntensityDistribution (scaled rings): per labelled pixel
    its object (0..n-1), ring (0..bins, ``bins`` = outside the last ring) and wedge (0..7, for RadialCV).

    Centre = the first (C order) pixel farthest from the object's edge; ring = distance propagated from the
    centre / (that distance + distance to the edge), in ``bins`` equal steps (centrosome's distance transform and
    propagation, as cp_measure)."""

    def __init__(self, objects: Objects, bins: int = RADIAL_BIN_COUNT):
        import centrosome.propagate

        labels, n = objects.clean, objects.n
        self.objects, self.bins = objects, bins
        # cp_measure computes the distance to the edge and the propagation per colour of a colouring in which no
        # two touching objects share a colour, on the whole image. Object by object on its bounding box grown by
        # 1 px gives the same values (the box's ring holds a nearest outside pixel; propagation never leaves the
        # object) for ~1/4 of the cost.
        h, w = labels.shape
        d_to_edge = np.zeros(labels.shape)
        d_from_center = np.zeros(labels.shape)
        cl = np.zeros(labels.shape, int)
        ci, cj = np.zeros(n, np.intp), np.zeros(n, np.intp)
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None:
                continue
            ys = slice(max(sl[0].start - 1, 0), min(sl[0].stop + 1, h))
            xs = slice(max(sl[1].start - 1, 0), min(sl[1].stop + 1, w))
            mask = labels[ys, xs] == k
            dist = ndi.distance_transform_edt(mask)
            d_to_edge[ys, xs][mask] = dist[mask]
            # centre: the first pixel (C order) farthest from the edge, as cp_measure's tie-break
            y, x = np.unravel_index(np.argmax(np.where(mask, dist, -np.inf)), mask.shape)
            ci[k - 1], cj[k - 1] = y + ys.start, x + xs.start
            seeds = np.zeros(mask.shape, int)
            seeds[y, x] = k
            l_, d = centrosome.propagate.propagate(np.zeros(mask.shape), seeds, mask, 1)
            d_from_center[ys, xs][mask] = d[mask]
            cl[ys, xs][mask] = l_[mask]
        good = cl > 0
        self.good = good
        self.label = labels[good] - 1
        normalized = d_from_center[good] / (d_from_center[good] + d_to_edge[good] + 0.001)
        self.ring = np.minimum((normalized * bins).astype(int), bins)
        gi, gj = np.nonzero(good)
        i_center, j_center = ci[cl[good] - 1], cj[cl[good] - 1]
        self.wedge = ((gi > i_center).astype(int) + (gj > j_center).astype(int) * 2
                      + (np.abs(gi - i_center) > np.abs(gj - j_center)).astype(int) * 4)
        self.ring_count = np.bincount(self.label * (bins + 1) + self.ring,
                                      minlength=n * (bins + 1)).reshape(n, bins + 1).astype(np.float64)
        self.wedge_count = np.bincount((self.label * bins + np.minimum(self.ring, bins - 1)) * 8 + self.wedge,
                                       weights=(self.ring < bins).astype(np.float64),
                                       minlength=n * bins * 8).reshape(n, bins, 8)


def radial_distribution(geometry: RadialGeometry, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """``RadialDistribution_{FracAtD,MeanFrac,RadialCV}_{k}of{bins}`` of one channel, each (N,) float64.

    FracAtD: fraction of the object's intensity in ring k; MeanFrac: that / the fraction of its pixels in ring k;
    RadialCV: coefficient of variation of the 8 wedges' mean intensities within ring k (0 without pixels)."""
    g, n, bins = geometry, geometry.objects.n, geometry.bins
    values = pixels[g.good].astype(np.float64)
    hist = np.bincount(g.label * (bins + 1) + g.ring, weights=values, minlength=n * (bins + 1)).reshape(n, bins + 1)
    in_rings = g.ring < bins
    wedge_sum = np.bincount((g.label * bins + np.minimum(g.ring, bins - 1)) * 8 + g.wedge,
                            weights=np.where(in_rings, values, 0.0), minlength=n * bins * 8).reshape(n, bins, 8)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_at_d = hist / hist.sum(1, keepdims=True)
        frac_pixels = g.ring_count / g.ring_count.sum(1, keepdims=True)
        mean_frac = frac_at_d / (frac_pixels + np.finfo(float).eps)
        has = g.wedge_count > 0
        k = has.sum(2)
        wedge_mean = np.where(has, wedge_sum / np.where(has, g.wedge_count, 1.0), 0.0)
        mean = wedge_mean.sum(2) / k
        std = np.sqrt((np.where(has, wedge_mean - mean[..., None], 0.0) ** 2).sum(2) / k)
        # cp_measure divides masked arrays: an all-zero ring gives 0 / 0 -> its numerator, 0 (not NaN)
        cv = np.where((k == 0) | (mean == 0), 0.0, std / mean)
    out = {}
    for b in range(bins):
        out[f"RadialDistribution_FracAtD_{b + 1}of{bins}"] = geometry.objects.pick(frac_at_d[:, b])
        out[f"RadialDistribution_MeanFrac_{b + 1}of{bins}"] = geometry.objects.pick(mean_frac[:, b])
        out[f"RadialDistribution_RadialCV_{b + 1}of{bins}"] = geometry.objects.pick(cv[:, b])
    return out


# ---------------------------------------------------------------------------------------------- Zernike
def zernike_moments(objects: Objects, channels: np.ndarray,
                    degree: int = ZERNIKE_DEGREE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zernike moment sums of every object, unweighted and weighted by each channel, in one pass over the basis.

    Args:
        channels: (C, H, W) intensity images (may be C = 0).

    Returns:
        (indexes (K, 2) (n, m) pairs, sums (1 + C, n, K) complex128 [shape moments first], radii (n,) of the
        minimum enclosing circles, counts (n,) pixels per object). The basis is centrosome's (Horner on r^2,
        z = y + i x, zero outside the unit circle), as cp_measure's ``_zernike_scores``.
    """
    from centrosome import zernike

    indexes = zernike.get_zernike_indexes(degree + 1)
    n, k = objects.n, len(indexes)
    sums = np.zeros((1 + len(channels), n, k), np.complex128)
    if n == 0:
        return indexes, sums, np.zeros(0), np.zeros(0)
    centers, radii = zernike.minimum_enclosing_circle(objects.clean, np.arange(1, n + 1))
    radii = np.asarray(radii, dtype=float)
    rows, cols = np.nonzero(objects.clean)
    seg = objects.clean[rows, cols] - 1
    counts = np.bincount(seg, minlength=n).astype(np.float64)
    weights = np.concatenate([np.ones((1, len(rows))), channels[:, rows, cols].astype(np.float64)])  # (1 + C, P)
    coeffs = zernike.construct_zernike_lookuptable(indexes)
    for start in range(0, len(rows), _ZERNIKE_BLOCK):
        sl = slice(start, start + _ZERNIKE_BLOCK)
        s_blk = seg[sl]
        with np.errstate(invalid="ignore", divide="ignore"):  # 1-px objects: radius 0 -> NaN -> cut below
            ym = (rows[sl] - centers[s_blk, 0]) / radii[s_blk]
            xm = (cols[sl] - centers[s_blk, 1]) / radii[s_blk]
        r_square = xm * xm + ym * ym
        z = ym + 1j * xm
        z_pows = [np.ones_like(z), z]  # z**m by repeated products, as cp_measure (faster than **)
        for _ in range(2, int(indexes[:, 1].max()) + 1):
            z_pows.append(z_pows[-1] * z)
        basis = np.empty((len(s_blk), k), np.complex128)
        for idx, (zn, zm) in enumerate(indexes):
            s = np.zeros_like(xm)
            for c in coeffs[idx, : (zn - zm) // 2 + 1]:  # Horner on r^2
                s *= r_square
                s += c
            s[r_square > 1] = 0
            basis[:, idx] = s * z_pows[zm] if zm else s
        # one sparse product for all weights: row w * n + object holds that weight of each of its pixels
        n_w, m = len(weights), len(s_blk)
        rows_w = (np.arange(n_w)[:, None] * n + s_blk[None, :]).ravel()
        member = scipy.sparse.csr_matrix((weights[:, sl].ravel(), (rows_w, np.tile(np.arange(m), n_w))),
                                         shape=(n_w * n, m))
        sums += (member @ basis).reshape(n_w, n, k)
    return indexes, sums, radii, counts


def zernike_features(objects: Objects, channels: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``Zernike_{n}_{m}`` (shape: |moment| / enclosing-circle area) and, per channel name in ``names``,
    ``RadialDistribution_Zernike{Magnitude,Phase}_{n}_{m}__<name>`` (|moment| / pixel count, and CellProfiler's
    ``arctan2(real, imag)``), each (N,) float64."""
    indexes, sums, radii, counts = zernike_moments(objects, channels)
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.abs(sums[0]) / (np.pi * radii * radii)[:, None]
        for i, (zn, zm) in enumerate(indexes):
            out[f"Zernike_{zn}_{zm}"] = objects.pick(shape[:, i])
        for c, name in enumerate(names):
            moments = sums[1 + c]
            magnitude = np.abs(moments) / counts[:, None]
            phase = np.arctan2(moments.real, moments.imag)
            for i, (zn, zm) in enumerate(indexes):
                out[f"RadialDistribution_ZernikeMagnitude_{zn}_{zm}__{name}"] = objects.pick(magnitude[:, i])
                out[f"RadialDistribution_ZernikePhase_{zn}_{zm}__{name}"] = objects.pick(phase[:, i])
    return out
