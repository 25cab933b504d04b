"""Baselines that use no image of the query compound.

``chemistry-nn``: each compound's profile is the real profile of its nearest *seen* neighbour by Tanimoto
similarity of Morgan fingerprint bits (a seen compound's own profile is never used for itself). It measures
what chemistry alone predicts: if it scores like a generator on unseen compounds, the images add nothing.
Ties in similarity go to the smallest compound id, so the choice does not depend on row order.
"""
from __future__ import annotations

import numpy as np


def tanimoto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tanimoto (Jaccard) similarity of bit vectors.

    Args:
        a: (n, D) bool/0-1 fingerprints. b: (m, D).

    Returns:
        (n, m) float64 |a & b| / |a | b|; 0 where both are empty.
    """
    a = np.asarray(a, dtype=bool).astype(np.float64)
    b = np.asarray(b, dtype=bool).astype(np.float64)
    inter = a @ b.T
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nearest_seen_neighbours(ids: np.ndarray, bits: np.ndarray, seen: np.ndarray, chunk: int = 2048
                            ) -> dict[str, str]:
    """Nearest seen compound (Tanimoto) of every compound, itself excluded.

    Args:
        ids: (n,) compound ids. bits: (n, D) fingerprint bits. seen: (n,) bool, candidates.
        chunk: query rows per block (memory chunk x n_seen float64).

    Returns:
        ``{id: nearest seen id}``; compounds with no other seen compound are absent.
    """
    ids = np.asarray(ids, dtype=object)
    seen = np.asarray(seen, dtype=bool)
    cand = np.flatnonzero(seen)
    # candidates sorted by id: argmax takes the first maximum, i.e. the smallest id among ties
    cand = cand[np.argsort(ids[cand].astype(str), kind="stable")]
    out: dict[str, str] = {}
    if len(cand) == 0:
        return out
    for start in range(0, len(ids), chunk):
        rows = np.arange(start, min(start + chunk, len(ids)))
        sim = tanimoto(bits[rows], bits[cand])
        sim[rows[:, None] == cand[None, :]] = -1.0   # never oneself
        best = sim.argmax(axis=1)
        for r, j in zip(rows, best):
            if sim[r - start, j] >= 0:
                out[str(ids[r])] = str(ids[cand[j]])
    return out
