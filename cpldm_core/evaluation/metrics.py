"""Ranking metrics of the nearest-neighbour classifier: two mAP definitions and ROC-AUC over labels.

* mAP (per query, metric ``mAP``): for each query, average precision of its true labels in the ranking of all
  labels by score (scikit-learn's step-wise definition, ties grouped), averaged over queries with at least one
  true label. Its chance level is high when there are few labels (~0.34 with 8 MoAs).
* mAP (per label, metric ``mAP-label``): for each label, average precision of its member queries in the
  ranking of all queries by that label's score, averaged over labels with a member (scikit-learn's
  ``average_precision_score(average="macro")``; the paper's definition). Its chance level is about the mean
  label frequency (~1/L for single-label tasks).
* ROC-AUC: for each label, the probability that a query holding it scores higher than one that does not
  (ties count one half: scikit-learn's value), averaged over labels with both positives and negatives.

Both accept a ``valid`` mask of (query, label) pairs to leave out: a compound drawn as a reference of a label
is not scored against that label in that fold. Both are vectorised: one sort of the (q, L) score matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


#: Queries per block in the AP computation: bounds the float64/int64 (block, L) temporaries.
AP_CHUNK = 2048


def average_precision_per_query(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None,
                                chunk: int = AP_CHUNK) -> np.ndarray:
    """Average precision of each query (row) over its labels.

    Args:
        scores: (q, L) float, higher = more likely. truth: (q, L) bool. valid: (q, L) bool or None.
        chunk: rows per block (memory: a few chunk x L x 8-byte temporaries).

    Returns:
        (q,) float64; NaN for rows without a (valid) true label.
    """
    out = np.empty(len(scores), dtype=np.float64)
    for start in range(0, len(scores), chunk):
        block = slice(start, start + chunk)
        out[block] = _ap_block(scores[block], truth[block], None if valid is None else valid[block])
    return out


def _ap_block(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if valid is not None:
        truth = truth & valid
        # left-out pairs sink below every valid score as negatives: they then change no precision value
        scores = np.where(valid, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    t = np.take_along_axis(truth, order, axis=1)
    tp = np.cumsum(t, axis=1)
    positions = np.arange(1, s.shape[1] + 1)
    precision = tp / positions
    # a threshold is the last element of a run of tied scores
    end = np.ones_like(t)
    end[:, :-1] = s[:, :-1] != s[:, 1:]
    tp_at_end = np.where(end, tp, 0)
    previous = np.zeros_like(tp)
    previous[:, 1:] = np.maximum.accumulate(tp_at_end, axis=1)[:, :-1]
    gained = np.where(end, tp - previous, 0)
    n_pos = truth.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (gained * precision).sum(axis=1) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def roc_auc_per_label(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """ROC-AUC of each label (column) over the queries.

    Returns:
        (L,) float64; NaN for labels without both a positive and a negative valid query.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    out = np.full(scores.shape[1], np.nan)
    for j in range(scores.shape[1]):
        rows = slice(None) if valid is None else valid[:, j]
        s, t = scores[rows, j], truth[rows, j]
        n_pos = int(t.sum())
        n_neg = len(t) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(s)  # average ranks: ties count one half (Mann-Whitney U)
        out[j] = (ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def mean_average_precision(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
                           ) -> tuple[float, int]:
    """(mAP over queries with a true label, number of such queries)."""
    ap = average_precision_per_query(scores, truth, valid)
    n = int(np.isfinite(ap).sum())
    return (float(np.nanmean(ap)) if n else float("nan")), n


def average_precision_per_label(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
                                ) -> np.ndarray:
    """Average precision of each label (column) over the queries: the per-query AP of the transposed matrices.

    Returns:
        (L,) float64; NaN for labels without a (valid) member query.
    """
    return average_precision_per_query(np.asarray(scores).T, np.asarray(truth).T,
                                       None if valid is None else np.asarray(valid).T)


def mean_average_precision_per_label(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
                                     ) -> tuple[float, int]:
    """(macro mean of the per-label APs over labels with a member, number of such labels)."""
    ap = average_precision_per_label(scores, truth, valid)
    n = int(np.isfinite(ap).sum())
    return (float(np.nanmean(ap)) if n else float("nan")), n


def mean_roc_auc(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, int]:
    """(ROC-AUC averaged over scorable labels, number of such labels)."""
    auc = roc_auc_per_label(scores, truth, valid)
    n = int(np.isfinite(auc).sum())
    return (float(np.nanmean(auc)) if n else float("nan")), n
