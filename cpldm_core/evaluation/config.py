"""Configuration of the evaluation stage (frozen dataclass + presets).

Defaults follow the paper (METHOD.md "Evaluation"): labels with >= 10 compounds, K = 5 reference compounds
per label, sign consistency > 85 %, 10 folds; profile processing follows the JUMP profiling recipe (variant
features -> MAD normalisation vs DMSO -> outlier drop/clip -> pycytominer feature selection). Presets shrink the
thresholds for the small simulated worlds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

#: Paper: "Keep MoAs/targets with >= 10 compounds".
PAPER_MIN_COMPOUNDS = 10
#: Paper (Pahl et al. 2023 subprofiles): 5 random reference compounds per label.
PAPER_N_REFERENCES = 5
#: Paper: features whose sign is consistent in > 85 % of the reference profiles.
PAPER_SIGN_CONSISTENCY = 0.85
#: Paper: 10-fold cross-validation re-drawing the references.
PAPER_N_FOLDS = 10


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `cpldm evaluate` needs besides the lake.

    Attributes:
        run: evaluation run name; outputs go to ``eval/run=<run>/`` and ``eval/<run>/``.
        data_types: restrict to these data types (``real``, ``real-harmony``, ``c-aware-N10`` ...); empty = all
            found in the lake.
        min_compounds_moa / min_compounds_target: keep labels with at least this many (single-MoA / any) compounds.
        n_references: K reference compounds drawn per label and fold.
        sign_consistency: keep a feature in a subprofile when the share of references agreeing with the
            majority sign is strictly greater than this.
        n_folds: cross-validation folds (each re-draws the references).
        reference_pool: draw references from ``all`` labelled compounds or only ``seen`` ones.
        seed: base seed; fold f uses ``numpy.random.default_rng([seed, f])``.
        variant_features: keep only features whose DMSO MAD is non-zero (and |MAD/median| > min_abs_coef_var)
            in every plate / synthetic run before normalising (the JUMP recipe's ``var`` step).
        min_abs_coef_var: the recipe's 1e-3.
        mad_epsilon: added to the MAD (pycytominer ``mad_robustize_epsilon``).
        outlier_threshold: after normalising, drop features whose 99th percentile of |value| exceeds this and clip
            the rest to +-this (the recipe's ``outlier`` step, 100); 0 turns the step off.
        feature_ops: pycytominer feature-selection operations, applied in this order.
        na_cutoff, corr_threshold, min_variance: pycytominer's parameters (its defaults).
        feature_select_max_rows: rows (evenly spaced) used to *choose* features on very large tables.
        harmony_batch_key: ``batch``, ``source`` or ``both`` (both = Metadata_Source and Metadata_Batch).
        harmony_max_iter: harmonypy ``max_iter_harmony``.
        harmony_sigma: harmonypy soft-clustering bandwidth (its default 0.1; raise it, e.g. to 0.3, when batch
            effects dominate the biology: batches then form clusters of their own and stay uncorrected).
        copairs: also compute copairs mAP (activity vs DMSO, consistency within MoA).
        copairs_null_size: permutations for copairs' mAP p-values.
        embedding: ``umap`` (umap-learn) or ``pca`` (fast, for CI) for the profile maps in the report.
        embedding_max_points: well-level rows per data type drawn for the map.
        score_chunk: query rows scored per chunk (bounds memory: chunk x features float64).
        alpha: family-wise error rate for Tukey HSD.
        report: write figures and report.html (tables and statistics are always written).
        annotations: Repurposing-Hub style file (InChIKey + moa/target) used instead of the annotation tables.
        inchikey_prefix14: join that file on the first 14 InChIKey characters (ignores stereo/salt).
        annotation_key: join that file on this column instead, holding the lake's compound ids (the compound
            column of `cpldm profile import`: a name, a Broad id ...).
        concurrency: data types evaluated at once as Ray tasks; 0 = in the driver process, no Ray.
        num_cpus: CPUs reserved per Ray task.
    """

    run: str = "default"
    data_types: tuple[str, ...] = ()
    min_compounds_moa: int = PAPER_MIN_COMPOUNDS
    min_compounds_target: int = PAPER_MIN_COMPOUNDS
    n_references: int = PAPER_N_REFERENCES
    sign_consistency: float = PAPER_SIGN_CONSISTENCY
    n_folds: int = PAPER_N_FOLDS
    reference_pool: Literal["all", "seen"] = "all"
    seed: int = 0
    variant_features: bool = True
    min_abs_coef_var: float = 1e-3
    mad_epsilon: float = 1e-18
    outlier_threshold: float = 100.0
    feature_ops: tuple[str, ...] = ("variance_threshold", "correlation_threshold", "drop_na_columns")
    na_cutoff: float = 0.05
    corr_threshold: float = 0.9
    min_variance: float = 1e-6
    feature_select_max_rows: int = 20000
    harmony_batch_key: Literal["batch", "source", "both"] = "batch"
    harmony_max_iter: int = 10
    harmony_sigma: float = 0.1
    copairs: bool = True
    copairs_null_size: int = 1000
    embedding: Literal["umap", "pca"] = "umap"
    embedding_max_points: int = 3000
    score_chunk: int = 4096
    alpha: float = 0.05
    report: bool = True
    annotations: str = ""
    inchikey_prefix14: bool = False
    annotation_key: str = ""
    concurrency: int = 1
    num_cpus: float = 1.0

    def __post_init__(self):
        if self.n_references < 1:
            raise ValueError("n_references must be >= 1")
        if not 0.0 <= self.sign_consistency < 1.0:
            raise ValueError("sign_consistency must be in [0, 1)")
        if self.n_folds < 1:
            raise ValueError("n_folds must be >= 1")
        if min(self.min_compounds_moa, self.min_compounds_target) < 2:
            raise ValueError("min_compounds_* must be >= 2 (a label needs a reference and a query)")


#: ``paper``: the published protocol; ``demo``: the embedded default on the small simulated world;
#: ``tiny``: CI (seconds: few folds, PCA maps, small copairs null).
PRESETS: dict[str, EvaluateConfig] = {
    "paper": EvaluateConfig(),
    "demo": EvaluateConfig(min_compounds_moa=4, min_compounds_target=4, n_references=3, n_folds=10,
                           copairs_null_size=200, embedding="umap", embedding_max_points=2000),
    "tiny": EvaluateConfig(min_compounds_moa=3, min_compounds_target=3, n_references=2, n_folds=3,
                           copairs_null_size=50, embedding="pca", embedding_max_points=500),
}


def preset(name: str, **overrides) -> EvaluateConfig:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown evaluate preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
