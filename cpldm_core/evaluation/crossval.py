"""Cross-validated subprofile prediction: each fold re-draws the K reference compounds of every label.

Per fold: draw references -> build subprofiles -> score every labelled compound against every label ->
mAP and ROC-AUC separately on the seen and the unseen query compounds. A reference is never a query for
its own label; for single-label tasks (MoA) references are removed from the queries altogether (so that
the queries of a fold are exactly the non-reference compounds), for multi-label tasks only the
(reference, label) pairs are left out (with hundreds of targets nearly every compound is some target's
reference). A ``mAP-chance`` / ``ROC-AUC-chance`` row scores the same queries with random numbers drawn from
the fold's generator: the level a method must beat.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cpldm_core.evaluation.labels import LabelSet
from cpldm_core.evaluation.metrics import mean_average_precision, mean_average_precision_per_label, mean_roc_auc
from cpldm_core.evaluation.subprofiles import EMPTY_SCORE, biosimilarity, build_subprofiles

SPLITS = ("seen", "unseen")
RESULT_COLUMNS = ["fold", "query_split", "metric", "value", "n_queries"]


def draw_references(labels: LabelSet, k: int, rng: np.random.Generator, pool: np.ndarray | None = None
                    ) -> list[np.ndarray]:
    """Per label, up to ``k`` member rows drawn without replacement (from ``pool`` rows when given)."""
    allowed = np.ones(len(labels.compounds), dtype=bool) if pool is None else np.asarray(pool, dtype=bool)
    out = []
    for j in range(len(labels.labels)):
        members = labels.members(j)
        members = members[allowed[members]]
        out.append(np.sort(rng.choice(members, size=min(k, len(members)), replace=False)))
    return out


def score_fold(profiles: np.ndarray, references: list[np.ndarray], threshold: float,
               groups: np.ndarray | None = None, chunk: int = 4096) -> np.ndarray:
    """Biosimilarity of every row with every label's subprofile.

    Args:
        profiles: (n, f) treatment profiles. references: per label, reference rows.
        groups: (n,) compound of each row when rows are treatments (compound x dose). Not-same-compound rule:
            a row is scored against a subprofile built without the references of its own compound (another
            dose of the query's compound is never its reference); None = rows are compounds.

    Returns:
        (n, L) float32 scores.
    """
    masks, values = build_subprofiles(profiles, references, threshold)
    scores = biosimilarity(profiles, masks, values, chunk=chunk)
    if groups is None:
        return scores
    groups = np.asarray(groups)
    for j, refs in enumerate(references):
        refs = np.asarray(refs, dtype=int)
        for g in np.unique(groups[refs]):
            rows = np.flatnonzero(groups == g)
            rest = refs[groups[refs] != g]
            if len(rest):
                mask, value = build_subprofiles(profiles, [rest], threshold)
                scores[rows, j] = biosimilarity(profiles[rows], mask, value, chunk=chunk)[:, 0]
            else:
                scores[rows, j] = EMPTY_SCORE
    return scores


def evaluate_fold(profiles: np.ndarray, labels: LabelSet, split: np.ndarray, references: list[np.ndarray],
                  threshold: float, rng: np.random.Generator | None = None, chunk: int = 4096,
                  groups: np.ndarray | None = None) -> list[dict]:
    """Metrics of one fold.

    Args:
        profiles: (n, f) float32 profiles, row i = ``labels.compounds[i]``.
        split: (n,) "seen" / "unseen" per compound.
        references: per label, reference row indices.
        threshold: sign-consistency threshold.
        rng: draws the chance-level scores (skipped when None).
        groups: (n,) compound per row for dose-aware not-same-compound scoring (see :func:`score_fold`).

    Returns:
        Rows {query_split, metric, value, n_queries} for mAP (per query), mAP-label (per label, macro) and
        ROC-AUC, and their chance levels (``-chance``).
    """
    scores = score_fold(profiles, references, threshold, groups, chunk)
    truth = labels.membership
    valid = np.ones_like(truth)
    for j, rows in enumerate(references):
        valid[rows, j] = False
    single_label = bool((truth.sum(axis=1) == 1).all())
    if single_label and references:
        valid[np.concatenate(references).astype(int)] = False
    random_scores = rng.random(scores.shape, dtype=np.float32) if rng is not None else None
    rows_out = []
    for name in SPLITS:
        rows = (split == name) & valid.any(axis=1)
        if not rows.any():
            continue
        variants = [("", scores)] + ([("-chance", random_scores)] if random_scores is not None else [])
        for suffix, s in variants:
            m, n_ap = mean_average_precision(s[rows], truth[rows], valid[rows])
            m_label, n_labels = mean_average_precision_per_label(s[rows], truth[rows], valid[rows])
            auc, _ = mean_roc_auc(s[rows], truth[rows], valid[rows])
            rows_out.append({"query_split": name, "metric": f"mAP{suffix}", "value": m, "n_queries": n_ap})
            # n_queries of a per-label row counts the labels averaged
            rows_out.append({"query_split": name, "metric": f"mAP-label{suffix}", "value": m_label,
                             "n_queries": n_labels})
            rows_out.append({"query_split": name, "metric": f"ROC-AUC{suffix}", "value": auc,
                             "n_queries": int(rows.sum())})
    return rows_out


def cross_validate(profiles: np.ndarray, labels: LabelSet, split: np.ndarray, n_folds: int, k: int,
                   threshold: float, seed: int = 0, reference_pool: str = "all", chunk: int = 4096,
                   groups: np.ndarray | None = None) -> pd.DataFrame:
    """``n_folds`` folds of subprofile prediction.

    Args:
        profiles: (n, f) profiles aligned with ``labels.compounds``. split: (n,) "seen"/"unseen".
        n_folds, k, threshold: folds, references per label, sign-consistency threshold.
        seed: fold f draws with ``default_rng([seed, f])`` (same references for every data type).
        reference_pool: ``all`` or ``seen`` (references only from seen compounds).
        groups: (n,) compound per row when rows are treatments (compound x dose): not-same-compound scoring.

    Returns:
        DataFrame [fold, query_split, metric, value, n_queries].
    """
    profiles = np.asarray(profiles, dtype=np.float32)
    split = np.asarray(split).astype(str)
    if len(profiles) != len(labels.compounds) or len(split) != len(profiles):
        raise ValueError(f"profiles {profiles.shape}, split {split.shape} and {len(labels.compounds)} "
                         "labelled compounds disagree")
    pool = (split == "seen") if reference_pool == "seen" else None
    rows = []
    for fold in range(n_folds):
        rng = np.random.default_rng([seed, fold])
        references = draw_references(labels, k, rng, pool)
        for row in evaluate_fold(profiles, labels, split, references, threshold, rng, chunk, groups):
            rows.append({"fold": fold, **row})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
