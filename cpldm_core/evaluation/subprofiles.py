"""Subprofiles (Pahl et al. 2023) and biosimilarity scoring of query compounds against every label.

For each label, K reference compounds are drawn; a feature enters the label's subprofile when the share of
references whose sign agrees with the majority sign is strictly above the threshold (0.85 in the paper, so
with K = 5 all five must agree); its value is the median over the references. Biosimilarity of a query and a
label is the Pearson correlation of the query's values and the subprofile's values on the subprofile's
features only.

Scoring is vectorised over labels with masked moments: with M (L, f) the feature masks and V (L, f) the
subprofile values (0 outside the mask), the per-(query, label) sums over masked features are matrix products
of the (chunk, f) query block with M.T and V.T, so memory is O(chunk x f + queries x labels) and no
(queries x queries) matrix is ever formed.
"""
from __future__ import annotations

import numpy as np

#: Score of a label whose subprofile has fewer than MIN_FEATURES features (or a constant query): below any
#: Pearson correlation, so such labels rank last instead of producing NaN.
EMPTY_SCORE = -2.0
#: A Pearson correlation needs at least two points.
MIN_FEATURES = 2
#: n*sum(x^2) - sum(x)^2 below this fraction of n*sum(x^2) means "constant" (float64 cancellation).
CONSTANT_TOL = 1e-10


def build_subprofile(references: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One label's subprofile.

    Args:
        references: (K, f) float profiles of the reference compounds (NaN-free).
        threshold: keep features whose majority-sign share is strictly greater than this.

    Returns:
        (mask (f,) bool, values (f,) float32 = median over references where mask, 0 elsewhere).
    """
    references = np.asarray(references, dtype=np.float64)
    signs = np.sign(references)
    positive = (signs > 0).mean(axis=0)
    negative = (signs < 0).mean(axis=0)
    mask = np.maximum(positive, negative) > threshold
    values = np.where(mask, np.median(references, axis=0), 0.0).astype(np.float32)
    return mask, values


def build_subprofiles(profiles: np.ndarray, references: list[np.ndarray], threshold: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Subprofiles of every label.

    Args:
        profiles: (n, f) compound profiles. references: per label, the row indices of its references.

    Returns:
        (masks (L, f) bool, values (L, f) float32).
    """
    n_features = profiles.shape[1]
    masks = np.zeros((len(references), n_features), dtype=bool)
    values = np.zeros((len(references), n_features), dtype=np.float32)
    for i, rows in enumerate(references):
        masks[i], values[i] = build_subprofile(profiles[rows], threshold)
    return masks, values


def biosimilarity(queries: np.ndarray, masks: np.ndarray, values: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Pearson correlation of every query with every subprofile on the subprofile's features.

    Args:
        queries: (q, f) float profiles (NaN-free).
        masks: (L, f) bool subprofile features. values: (L, f) subprofile values (ignored outside masks).
        chunk: queries per block (memory: chunk x f x 8 bytes, three times).

    Returns:
        (q, L) float32 scores in [-1, 1]; ``EMPTY_SCORE`` where a subprofile has < 2 features or the query
        (or the subprofile) is constant on them.
    """
    m = masks.astype(np.float64)                       # (L, f)
    v = np.where(masks, values, 0.0).astype(np.float64)  # (L, f)
    n = m.sum(axis=1)                                  # (L,)
    sy = v.sum(axis=1)
    syy = (v * v).sum(axis=1)
    var_y = n * syy - sy * sy
    out = np.empty((len(queries), len(masks)), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        x = np.asarray(queries[start:start + chunk], dtype=np.float64)
        sx = x @ m.T
        sxx = (x * x) @ m.T
        sxy = x @ v.T
        var_x = n * sxx - sx * sx
        cov = n * sxy - sx * sy
        denom = np.sqrt(np.clip(var_x, 0, None) * np.clip(var_y, 0, None))
        # relative tolerance: a constant vector's variance is rounding noise, not signal
        ok = (n >= MIN_FEATURES) & (var_x > CONSTANT_TOL * n * sxx) & (var_y > CONSTANT_TOL * n * syy)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(ok, cov / np.where(ok, denom, 1.0), EMPTY_SCORE)
        out[start:start + chunk] = np.clip(r, EMPTY_SCORE, 1.0)
    return out
