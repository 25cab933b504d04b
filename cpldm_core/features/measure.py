"""Per-object features named as CellProfiler names them (``Nuclei_AreaShape_Area``, ``Cells_Intensity_MeanIntensity_ER``).

Two feature sets:

- ``default``: vectorised per-label computations (one pass over the label image with ``np.bincount`` / a single
  sort, ``skimage.measure.regionprops_table``) that give the same values as cp_measure for the features they
  cover (tests/test_features_measure.py checks this against cp_measure). ~tens of ms for a small image.
  Per compartment: 13 AreaShape, 12 Intensity x channel, Pearson correlation per channel pair, 7 Haralick
  texture features x channel x direction (scale 3, 256 levels).
- ``full``: cp_measure's ``featurize`` (every group; Costes optional) renamed to CellProfiler's names.

Images are float32 (C, H, W) in [0, 1] (uint16 / 65535); labels are int (H, W), background 0, and the same
object number across compartments. Missing measurements (an empty cytoplasm, a texture without pixel pairs)
are NaN.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import scipy.ndimage as ndi
import skimage.measure
import skimage.segmentation
import skimage.util

#: mahotas' 2-D co-occurrence offsets (dy, dx) in its direction order, which CellProfiler's texture names use.
HARALICK_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))
#: CellProfiler 3+ texture gray levels (the ``_256`` suffix of JUMP texture columns).
TEXTURE_GRAY_LEVELS = 256

AREASHAPE_FEATURES = (
    "Area", "Perimeter", "FormFactor", "Compactness", "Eccentricity", "MajorAxisLength", "MinorAxisLength",
    "Extent", "Solidity", "EquivalentDiameter", "MaximumRadius", "MeanRadius", "MedianRadius",
)
INTENSITY_FEATURES = (
    "IntegratedIntensity", "MeanIntensity", "StdIntensity", "MinIntensity", "MaxIntensity",
    "LowerQuartileIntensity", "MedianIntensity", "UpperQuartileIntensity", "MADIntensity", "MassDisplacement",
    "IntegratedIntensityEdge", "MeanIntensityEdge",
)
TEXTURE_FEATURES = (
    "AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment", "SumAverage",
    "Entropy",
)


# ---------------------------------------------------------------------------------------------- per-label helpers
def _present(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pixel counts per requested id (0 where absent)."""
    counts = np.bincount(labels.ravel(), minlength=int(ids.max(initial=0)) + 1)
    return counts[ids]


def _interp(sorted_values: np.ndarray, starts: np.ndarray, counts: np.ndarray, frac: float) -> np.ndarray:
    """numpy.percentile 'linear' quantile ((n-1) * frac) of each label's sorted run; NaN for empty runs."""
    out = np.full(len(starts), np.nan)
    ok = counts > 0
    pos = (counts[ok] - 1) * frac
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts[ok] - 1)
    f = pos - lo
    base = starts[ok]
    out[ok] = sorted_values[base + lo] * (1.0 - f) + sorted_values[base + hi] * f
    return out


def _order_by_label_then_value(values: np.ndarray, lab: np.ndarray, n_max: int) -> np.ndarray:
    """Permutation sorting pixels by (label, value) = ``np.lexsort((values, lab))``, ~5x faster: one value sort,
    then numpy's radix sort (stable, for 16-bit keys) by label."""
    if n_max > np.iinfo(np.uint16).max:
        return np.lexsort((values, lab))
    by_value = np.argsort(values)
    return by_value[np.argsort(lab[by_value].astype(np.uint16), kind="stable")]


# ---------------------------------------------------------------------------------------------- AreaShape
def _ellipse_axes(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Major/minor axis lengths (px) and eccentricity of the ellipse with the same second moments, for all
    objects at once from per-label central moments (skimage's inertia-tensor definitions)."""
    n_max = int(max(np.max(ids, initial=0), labels.max())) + 1
    index = np.flatnonzero(labels)  # background pixels only feed bin 0: leave them out
    flat = labels.ravel()[index]
    yy, xx = np.divmod(index, labels.shape[1])
    yy, xx = yy.astype(np.float64), xx.astype(np.float64)
    n = np.bincount(flat, minlength=n_max).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cy = np.bincount(flat, weights=yy, minlength=n_max) / n
        cx = np.bincount(flat, weights=xx, minlength=n_max) / n
        dy, dx = yy - cy[flat], xx - cx[flat]
        mu_yy = np.bincount(flat, weights=dy * dy, minlength=n_max) / n
        mu_xx = np.bincount(flat, weights=dx * dx, minlength=n_max) / n
        mu_xy = np.bincount(flat, weights=dx * dy, minlength=n_max) / n
        half_trace = (mu_yy + mu_xx) / 2
        root = np.sqrt(((mu_yy - mu_xx) / 2) ** 2 + mu_xy ** 2)
        big, small = half_trace + root, np.maximum(half_trace - root, 0.0)
        eccentricity = np.where(big > 0, np.sqrt(1.0 - small / big), 0.0)
    ids = np.asarray(ids, dtype=np.int64)
    return 4 * np.sqrt(big[ids]), 4 * np.sqrt(small[ids]), eccentricity[ids]


def areashape(labels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """CellProfiler AreaShape features (:data:`AREASHAPE_FEATURES`) of the objects ``ids``, each (N,) float64.

    Same definitions as cp_measure's ``get_sizeshape`` (skimage regionprops; radii from the Euclidean distance
    transform of each padded object).
    """
    out = {k: np.full(len(ids), np.nan) for k in AREASHAPE_FEATURES}
    if len(ids) == 0 or labels.max() == 0:
        return out
    props = skimage.measure.regionprops_table(
        labels, properties=("label", "area", "perimeter", "solidity", "extent", "image"))
    row = {int(lab): i for i, lab in enumerate(props["label"])}
    idx = np.array([row.get(int(i), -1) for i in ids])
    found = idx >= 0
    take = idx[found]

    def put(name, values):
        out[name][found] = np.asarray(values, dtype=np.float64)[take]

    area, perimeter = props["area"].astype(np.float64), props["perimeter"].astype(np.float64)
    put("Area", area)
    put("Perimeter", perimeter)
    with np.errstate(divide="ignore", invalid="ignore"):
        put("FormFactor", 4.0 * np.pi * area / perimeter ** 2)
    put("Compactness", perimeter ** 2 / np.maximum(4.0 * np.pi * area, 1.0))
    major, minor, eccentricity = _ellipse_axes(labels, props["label"])
    put("Eccentricity", eccentricity)
    put("MajorAxisLength", major)
    put("MinorAxisLength", minor)
    put("Extent", props["extent"])
    put("Solidity", props["solidity"])
    put("EquivalentDiameter", np.sqrt(4.0 * area / np.pi))
    radii = np.zeros((len(props["label"]), 3))
    for i, mini in enumerate(props["image"]):
        mini = np.pad(mini, 1)
        inside = ndi.distance_transform_edt(mini)[mini]
        radii[i] = inside.max(), inside.mean(), np.median(inside)
    put("MaximumRadius", radii[:, 0])
    put("MeanRadius", radii[:, 1])
    put("MedianRadius", radii[:, 2])
    return out


# ---------------------------------------------------------------------------------------------- Intensity
class LabelledPixels:
    """The labelled pixels of one label image, flattened once and shared by every channel's measurement.

    Attributes: ``lab`` (P,) int64 object numbers, ``index`` (P,) flat pixel indices, ``y``/``x`` (P,) float64
    coordinates, ``n_max`` bincount length, ``count`` (n_max,) pixels per object, ``edge`` (P,) bool inner
    boundary pixels (CellProfiler's edge), ``shape`` (H, W), for P labelled pixels.
    """

    def __init__(self, labels: np.ndarray, ids: np.ndarray):
        labels = np.asarray(labels)
        self.index = np.flatnonzero(labels)
        self.lab = labels.ravel()[self.index].astype(np.int64)
        self.n_max = int(max(np.max(ids, initial=0), labels.max(initial=0))) + 1
        y, x = np.divmod(self.index, labels.shape[1])
        self.y, self.x = y.astype(np.float64), x.astype(np.float64)
        self.count = np.bincount(self.lab, minlength=self.n_max).astype(np.float64)
        self.edge = skimage.segmentation.find_boundaries(labels, mode="inner").ravel()[self.index]
        self.ids = np.asarray(ids, dtype=np.int64)
        self.shape = labels.shape

    def sum(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.lab, weights=weights, minlength=self.n_max)

    def values(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.ravel()[self.index].astype(np.float64)


def intensity(labels: np.ndarray | LabelledPixels, pixels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """CellProfiler Intensity features (:data:`INTENSITY_FEATURES`) of one channel, each (N,) float64.

    Same definitions as cp_measure ``get_intensity`` (legacy=False: numpy 'linear' quartiles, textbook MAD,
    population std; edge = inner boundary pixels). ``labels`` may be a :class:`LabelledPixels` shared across
    channels.
    """
    lp = labels if isinstance(labels, LabelledPixels) else LabelledPixels(labels, ids)
    ids = np.asarray(ids, dtype=np.int64)
    vals = lp.values(pixels)
    n = lp.count
    total = lp.sum(vals)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / n
        var = lp.sum((vals - mean[lp.lab]) ** 2) / n
        cy, cx = lp.sum(lp.y) / n, lp.sum(lp.x) / n
        my, mx = lp.sum(lp.y * vals) / total, lp.sum(lp.x * vals) / total
        displacement = np.sqrt((my - cy) ** 2 + (mx - cx) ** 2)
        n_edge = np.bincount(lp.lab[lp.edge], minlength=lp.n_max).astype(np.float64)
        sum_edge = np.bincount(lp.lab[lp.edge], weights=vals[lp.edge], minlength=lp.n_max)
        mean_edge = sum_edge / n_edge

    # quantiles: one sort by (label, value); each object's values are then one contiguous run
    order = _order_by_label_then_value(vals, lp.lab, lp.n_max)
    lab_s, val_s = lp.lab[order], vals[order]
    counts_all = n.astype(np.int64)
    starts_all = np.concatenate([[0], np.cumsum(counts_all)[:-1]])
    starts, counts = starts_all[ids], counts_all[ids]
    median = _interp(val_s, starts, counts, 0.5)
    med_all = np.zeros(lp.n_max)
    med_all[ids] = np.nan_to_num(median)
    dev = np.abs(val_s - med_all[lab_s])
    mad = _interp(dev[_order_by_label_then_value(dev, lab_s, lp.n_max)], starts, counts, 0.5)
    empty = counts == 0
    last = max(len(val_s) - 1, 0)
    minimum = val_s[np.minimum(starts, last)] if len(val_s) else np.zeros(len(ids))
    maximum = val_s[np.clip(starts + counts - 1, 0, last)] if len(val_s) else np.zeros(len(ids))

    def pick(a):
        a = np.asarray(a, dtype=np.float64)
        return np.where(empty, np.nan, a[ids] if len(a) == lp.n_max else a)

    return {
        "IntegratedIntensity": pick(total),
        "MeanIntensity": pick(mean),
        "StdIntensity": pick(np.sqrt(var)),
        "MinIntensity": np.where(empty, np.nan, minimum),
        "MaxIntensity": np.where(empty, np.nan, maximum),
        "LowerQuartileIntensity": _interp(val_s, starts, counts, 0.25),
        "MedianIntensity": median,
        "UpperQuartileIntensity": _interp(val_s, starts, counts, 0.75),
        "MADIntensity": mad,
        "MassDisplacement": pick(displacement),
        "IntegratedIntensityEdge": pick(sum_edge),
        "MeanIntensityEdge": pick(mean_edge),
    }


def intensity_edge_location(labels: np.ndarray | LabelledPixels, pixels: np.ndarray,
                            ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rest of cp_measure's 2-D intensity group (cp_measure keys, each (N,) float64): edge Std/Min/Max and
    ``Location_{CenterMassIntensity,MaxIntensity}_{X,Y}`` (px; the max is the first maximal pixel in C order;
    the always-zero ``_Z`` columns of 2-D images are left out). NaN for absent objects."""
    lp = labels if isinstance(labels, LabelledPixels) else LabelledPixels(labels, ids)
    ids, v = lp.ids, lp.values(pixels)
    ve, le = v[lp.edge], lp.lab[lp.edge]
    n_edge = np.bincount(le, minlength=lp.n_max).astype(np.float64)
    lo, hi = np.full(lp.n_max, np.inf), np.full(lp.n_max, -np.inf)
    np.minimum.at(lo, le, ve)
    np.maximum.at(hi, le, ve)
    peak = np.full(lp.n_max, -np.inf)
    np.maximum.at(peak, lp.lab, v)
    is_peak = v == peak[lp.lab]
    first = np.full(lp.n_max, np.iinfo(np.int64).max)
    np.minimum.at(first, lp.lab[is_peak], lp.index[is_peak])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_e = np.bincount(le, weights=ve, minlength=lp.n_max) / n_edge
        std_e = np.sqrt(np.maximum(np.bincount(le, weights=(ve - mean_e[le]) ** 2, minlength=lp.n_max) / n_edge, 0))
        total = lp.sum(v)
        cmi_x = np.where(total != 0, lp.sum(v * lp.x) / total, np.nan)
        cmi_y = np.where(total != 0, lp.sum(v * lp.y) / total, np.nan)
    empty = lp.count[ids] == 0
    max_y, max_x = np.divmod(np.where(empty, 0, first[ids]), lp.shape[1])

    def pick(per_label):  # (n_max,) -> (N,) rows of ids
        return np.where(empty, np.nan, per_label[ids])

    return {
        "Intensity_StdIntensityEdge": pick(std_e), "Intensity_MinIntensityEdge": pick(lo),
        "Intensity_MaxIntensityEdge": pick(hi), "Location_CenterMassIntensity_X": pick(cmi_x),
        "Location_CenterMassIntensity_Y": pick(cmi_y),
        "Location_MaxIntensity_X": np.where(empty, np.nan, max_x.astype(np.float64)),
        "Location_MaxIntensity_Y": np.where(empty, np.nan, max_y.astype(np.float64)),
    }


# ---------------------------------------------------------------------------------------------- Correlation
def pearson(labels: np.ndarray | LabelledPixels, first: np.ndarray, second: np.ndarray,
            ids: np.ndarray) -> np.ndarray:
    """Per-object Pearson correlation of two channels' pixels (N,) float64 (cp_measure ``Correlation_Pearson``,
    CellProfiler ``Correlation_Correlation``); NaN for empty or constant objects."""
    lp = labels if isinstance(labels, LabelledPixels) else LabelledPixels(labels, ids)
    return pearson_pairs(lp, np.stack([first, second]), ("first", "second"), ids)["first", "second"]


def pearson_pairs(lp: LabelledPixels, image: np.ndarray, channels: tuple[str, ...],
                  ids: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """:func:`pearson` of every channel pair, named in name order (``("AGP", "DNA")``), each (N,) float64; each
    channel's centred pixels are computed once instead of once per pair (same values)."""
    centred, norm = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in range(len(channels)):
            a = lp.values(image[c])
            centred.append(a - (lp.sum(a) / lp.count)[lp.lab])
            norm.append(lp.sum(centred[-1] * centred[-1]))
        out = {}
        for (a, ch_a), (b, ch_b) in itertools.combinations(sorted(enumerate(channels), key=lambda t: t[1]), 2):
            r = lp.sum(centred[a] * centred[b]) / np.sqrt(norm[a] * norm[b])
            out[ch_a, ch_b] = r[np.asarray(ids, dtype=np.int64)]
    return out


# ---------------------------------------------------------------------------------------------- Texture
def quantise_for_texture(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> uint8 levels exactly as cp_measure/CellProfiler (``img_as_ubyte``)."""
    return skimage.util.img_as_ubyte(np.clip(pixels, 0.0, 1.0))


class PixelPairs:
    """The pixel pairs of one label image at offset ``scale`` px along mahotas direction ``direction`` whose two
    pixels lie in the same object: flat indices ``first``/``second`` (M,) int64 and their object ``lab`` (M,).
    Channel-independent, so texture computes it once per compartment and offset for all channels."""

    def __init__(self, labels: np.ndarray, scale: int, direction: int):
        dy, dx = (scale * s for s in HARALICK_DIRECTIONS[direction])
        h, w = labels.shape
        y0, y1 = max(0, -dy), min(h, h - dy)
        x0, x1 = max(0, -dx), min(w, w - dx)
        la, lb = labels[y0:y1, x0:x1], labels[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        yy, xx = np.nonzero((la > 0) & (la == lb))
        self.first = (yy + y0) * w + (xx + x0)
        self.second = self.first + dy * w + dx
        self.lab = la[yy, xx]
        self.n_labels = int(labels.max(initial=0)) + 1


def haralick(labels: np.ndarray, levels: np.ndarray, ids: np.ndarray, scale: int,
             direction: int, pairs: PixelPairs | None = None) -> dict[str, np.ndarray]:
    """Haralick features (:data:`TEXTURE_FEATURES`) of every object at once, each (N,) float64.

    One symmetric gray-level co-occurrence count per object, pairs at ``scale`` px along mahotas direction
    ``direction``, pairs with a zero level or leaving the object excluded (mahotas ``ignore_zeros``, as
    cp_measure calls it). The co-occurrence matrices are kept sparse: every feature here is a sum over the
    nonzero (i, j) entries, so no 256 x 256 matrix per object is built. NaN when an object has no valid pair.
    ``pairs``: the :class:`PixelPairs` of ``labels`` at that offset, when shared across channels.
    """
    pairs = PixelPairs(labels, scale, direction) if pairs is None else pairs
    flat = levels.ravel()
    a, b = flat[pairs.first], flat[pairs.second]
    ok = (a > 0) & (b > 0)
    g = TEXTURE_GRAY_LEVELS
    # the matrix is symmetric ((i, j) and (j, i) both counted): count unordered pairs, half the values to sort,
    # in int32 keys when they fit (sorting is the cost of this function)
    key_type = np.int32 if pairs.n_labels * g * g < 2 ** 31 else np.int64
    a, b = a[ok], b[ok]
    lo, hi = np.minimum(a, b).astype(key_type), np.maximum(a, b).astype(key_type)
    keys, counts = np.unique((pairs.lab[ok].astype(key_type) * g + lo) * g + hi, return_counts=True)
    klab = (keys // (g * g)).astype(np.intp)
    ki, kj = ((keys // g) % g).astype(np.float64), (keys % g).astype(np.float64)
    # an off-diagonal unordered pair (a, b) stands for the entries (a, b) and (b, a), each with its count; a
    # diagonal one for (a, a) with twice its count. Sums over the matrix become sums over unordered pairs with
    # multiplicity 2 (off) or 1 (diagonal), of f symmetrised: (f(a, b) + f(b, a)) / 2.
    off = ki != kj
    n_max = max(int(ids.max(initial=0)) + 1, pairs.n_labels)
    total = np.zeros(n_max)
    sums = np.zeros((n_max, 8))
    if len(keys):
        # keys are sorted, so each object's entries are one run: one reduceat sums every feature of every object
        starts = np.flatnonzero(np.concatenate([[True], klab[1:] != klab[:-1]]))
        present = klab[starts]
        total[present] = np.add.reduceat(2.0 * counts, starts)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(off, counts, 2 * counts) / total[klab]
            w = np.where(off, 2.0, 1.0) * p  # matrix weight of the pair
            d2 = (ki - kj) ** 2
            # (8, M): each term a contiguous row, which reduceat sums faster than the columns of an (M, 8)
            terms = np.stack([w * p, w * d2, w / (1.0 + d2), w * (ki + kj), w * np.log2(p),
                              w * (ki + kj) / 2, w * (ki * ki + kj * kj) / 2, w * ki * kj])
        sums[present] = np.add.reduceat(terms, starts, axis=1).T
    asm, contrast, idm, sum_average, p_log_p, ux, sq, cross = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        vx = sq - ux ** 2
        sx = np.sqrt(np.maximum(vx, 0))
        corr = np.where(sx == 0, 1.0, (cross - ux * ux) / (sx * sx))
    out = {"AngularSecondMoment": asm, "Contrast": contrast, "Correlation": corr, "Variance": vx,
           "InverseDifferenceMoment": idm, "SumAverage": sum_average, "Entropy": -p_log_p}
    missing = total[ids] == 0
    return {k: np.where(missing, np.nan, v[ids]) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- default set
def default_features(image: np.ndarray, compartments: dict[str, np.ndarray], channels: tuple[str, ...],
                     ids: np.ndarray, texture_scale: int = 3,
                     texture_directions: tuple[int, ...] = (0,)) -> dict[str, np.ndarray]:
    """The default (vectorised) feature set: the :func:`cellprofiler_features` groups AreaShape, Intensity
    (without its edge and location measures), Correlation and Texture at one scale.

    Args:
        image: (C, H, W) float32 in [0, 1], channels in ``channels`` order.
        compartments: CellProfiler object name -> (H, W) int labels sharing object numbers.
        ids: (N,) object numbers to report, one row each.

    Returns:
        CellProfiler column name -> (N,) float64, e.g. ``Cells_Intensity_MeanIntensity_ER``,
        ``Nuclei_Texture_Contrast_DNA_3_00_256``, ``Cytoplasm_Correlation_Correlation_AGP_DNA``.
    """
    return cellprofiler_features(image, compartments, channels, ids, texture_scales=(texture_scale,),
                                 texture_directions=tuple(texture_directions), groups=DEFAULT_SET_GROUPS,
                                 edge_location=False)


#: Groups of :func:`cellprofiler_features` that make the default set.
DEFAULT_SET_GROUPS = ("areashape", "intensity", "correlation", "texture")


# ---------------------------------------------------------------------------------------------- cellprofiler set
#: JUMP's CellProfiler texture settings: scales 3, 5 and 10 px, all four directions (``_10_03_256`` columns).
CELLPROFILER_TEXTURE_SCALES = (3, 5, 10)
CELLPROFILER_TEXTURE_DIRECTIONS = (0, 1, 2, 3)


def cellprofiler_features(image: np.ndarray, compartments: dict[str, np.ndarray], channels: tuple[str, ...],
                          ids: np.ndarray, texture_scales: tuple[int, ...] = CELLPROFILER_TEXTURE_SCALES,
                          texture_directions: tuple[int, ...] = CELLPROFILER_TEXTURE_DIRECTIONS,
                          groups: tuple[str, ...] | None = None,
                          edge_location: bool = True) -> dict[str, np.ndarray]:
    """A CellProfiler-comparable set (JUMP's modules), every group vectorised and equal to cp_measure's values.

    Per compartment: AreaShape (13) and Zernike shape moments (30); per channel: Intensity (15) and Location
    (4), Texture (7 Haralick x ``texture_scales`` x ``texture_directions``), Granularity (16), RadialDistribution
    (12 rings + 60 Zernike magnitude/phase); Pearson correlation per channel pair. 3,024 columns for 5 channels
    and 3 compartments with the defaults. Shared work is computed once (see :mod:`cpldm_core.features.spatial`):
    granularity's image filtering per channel, radial geometry and the Zernike basis per compartment.

    Args and returns as :func:`default_features`; ``groups`` restricts to a subset of :data:`CELLPROFILER_GROUPS`
    (benchmarks time them one by one); ``edge_location`` False leaves the intensity edge and location measures
    out of the intensity group (the default set).
    """
    from cpldm_core.features import spatial

    groups = CELLPROFILER_GROUPS if groups is None else groups
    unknown = set(groups) - set(CELLPROFILER_GROUPS)
    if unknown:
        raise ValueError(f"unknown feature groups {sorted(unknown)}; choose from {CELLPROFILER_GROUPS}")
    ids = np.asarray(ids, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    if "texture" in groups:
        levels = [quantise_for_texture(image[c]) for c in range(len(channels))]
    if "granularity" in groups:
        spectra = [spatial.granular_spectrum(image[c]) for c in range(len(channels))]
    for obj, labels in compartments.items():
        labels = labels.astype(np.int64, copy=False)
        if "areashape" in groups:
            for name, values in areashape(labels, ids).items():
                out[f"{obj}_AreaShape_{name}"] = values
        if "intensity" in groups or "correlation" in groups:
            lp = LabelledPixels(labels, ids)
        if "intensity" in groups:
            for c, ch in enumerate(channels):
                for name, values in intensity(lp, image[c], ids).items():
                    out[f"{obj}_Intensity_{name}_{ch}"] = values
                for key, values in (intensity_edge_location(lp, image[c], ids) if edge_location else {}).items():
                    out[cellprofiler_name(obj, f"{key}__{ch}")] = values
        if "correlation" in groups:
            for (ch_a, ch_b), values in pearson_pairs(lp, image, channels, ids).items():
                out[f"{obj}_Correlation_Correlation_{ch_a}_{ch_b}"] = values
        if "texture" in groups:
            for scale in texture_scales:
                for direction in texture_directions:
                    pairs = PixelPairs(labels, scale, direction)
                    for c, ch in enumerate(channels):
                        for name, values in haralick(labels, levels[c], ids, scale, direction, pairs).items():
                            out[f"{obj}_Texture_{name}_{ch}_{scale}_{direction:02d}_{TEXTURE_GRAY_LEVELS}"] = values
        objects = spatial.Objects(labels, ids) if set(groups) & {"granularity", "radial", "zernike"} else None
        if "granularity" in groups and objects.n:
            operator = None
            for c, ch in enumerate(channels):
                if spectra[c] is not None and operator is None:
                    operator = spatial.upsample_mean_operator(objects, labels.shape, spectra[c].shape[1:])
                for key, values in spatial.granularity(objects, image[c], spectra[c], operator).items():
                    out[cellprofiler_name(obj, f"{key}__{ch}")] = values
        if "radial" in groups and objects.n:
            geometry = spatial.RadialGeometry(objects)
            for c, ch in enumerate(channels):
                for key, values in spatial.radial_distribution(geometry, image[c]).items():
                    out[cellprofiler_name(obj, f"{key}__{ch}")] = values
        if "zernike" in groups and objects.n:
            for key, values in spatial.zernike_features(objects, image, channels).items():
                out[cellprofiler_name(obj, key)] = values
    return out


#: Groups of :func:`cellprofiler_features`, in the order it measures them.
CELLPROFILER_GROUPS = ("areashape", "intensity", "correlation", "texture", "granularity", "radial", "zernike")


# ---------------------------------------------------------------------------------------------- full set (cp_measure)
_CHANNEL_KEY = re.compile(r"^(?P<key>.+?)__(?P<ch1>[^_]+)(?:__(?P<ch2>[^_]+))?$")


def cellprofiler_name(obj: str, key: str) -> str:
    """cp_measure column -> CellProfiler column of object ``obj``.

    ``Area`` -> ``Cells_AreaShape_Area``; ``Intensity_MeanIntensity__ER`` -> ``Cells_Intensity_MeanIntensity_ER``;
    ``Contrast_3_00_256__ER`` -> ``Cells_Texture_Contrast_ER_3_00_256``; ``Granularity_2__ER`` ->
    ``Cells_Granularity_2_ER``; ``RadialDistribution_FracAtD_1of4__ER`` -> ``Cells_RadialDistribution_FracAtD_ER_1of4``;
    ``Correlation_Pearson__DNA__ER`` -> ``Cells_Correlation_Correlation_DNA_ER``;
    ``Correlation_Manders_2__DNA__ER`` -> ``Cells_Correlation_Manders_ER_DNA`` (CellProfiler's M2 order).
    """
    m = _CHANNEL_KEY.match(key)
    if m is None:
        return f"{obj}_AreaShape_{key}"
    key, ch1, ch2 = m["key"], m["ch1"], m["ch2"]
    if ch2 is not None:
        body = key.removeprefix("Correlation_")
        body = "Correlation" if body == "Pearson" else body
        if body.endswith("_2"):
            return f"{obj}_Correlation_{body[:-2]}_{ch2}_{ch1}"
        return f"{obj}_Correlation_{body.removesuffix('_1')}_{ch1}_{ch2}"
    if key.startswith(("Intensity_", "Location_", "Granularity_")):
        return f"{obj}_{key}_{ch1}"
    if key.startswith("RadialDistribution_"):
        module, measure, suffix = key.split("_", 2)
        return f"{obj}_{module}_{measure}_{ch1}_{suffix}"
    texture = re.match(r"^([A-Za-z0-9]+)_(\d+_\d+_\d+)$", key)
    if texture:
        return f"{obj}_Texture_{texture[1]}_{ch1}_{texture[2]}"
    return f"{obj}_{key}_{ch1}"


def full_features(image: np.ndarray, compartments: dict[str, np.ndarray], channels: tuple[str, ...],
                  ids: np.ndarray, costes: bool = False, **groups: bool) -> dict[str, np.ndarray]:
    """cp_measure's feature set, renamed with :func:`cellprofiler_name`; rows follow ``ids`` (NaN where an
    object is absent from a compartment). ``groups`` switch cp_measure feature groups (``texture=False``...)."""
    import warnings

    from cp_measure.featurizer import featurize, make_featurizer_config

    ids = np.asarray(ids, dtype=np.int64)
    cfg = make_featurizer_config(list(channels), objects=["object"], correlation_costes=costes,
                                 correlation_costes_params={"scale_max": 65535} if costes else None, **groups)
    out: dict[str, np.ndarray] = {}
    for obj, labels in compartments.items():
        if not labels.any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, columns, rows = featurize(image[None].astype(np.float32), labels[None, None].astype(np.int32), cfg)
        row_of = {int(r[2]): i for i, r in enumerate(rows)}
        take = np.array([row_of.get(int(i), -1) for i in ids])
        for k, col in enumerate(columns):
            name = cellprofiler_name(obj, col)
            pair = re.fullmatch(rf"{obj}_Correlation_Correlation_(\w+?)_(\w+)", name)
            if pair and pair[1] > pair[2]:
                continue  # Pearson is symmetric: CellProfiler reports each pair once, in name order
            values = np.full(len(ids), np.nan)
            values[take >= 0] = data[take[take >= 0], k]
            out[name] = values
    return out
