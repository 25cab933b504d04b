"""The evaluation recipe of one data type as one pure function: well-level profiles + labels + config ->
results tables (no lake, no Ray, no DuckDB; ``pipelines/evaluate.py`` reads and writes around it).

Steps (JUMP profiling recipe, then the paper's evaluation):
  variant features among DMSO rows of every plate -> MAD normalisation vs DMSO per plate (a synthetic draw or
  run is a plate) -> outlier drop/clip -> pycytominer feature selection -> [Harmony] -> mean per compound over
  the rows chosen for profiles (the g-estimate for synthetic draws) -> [profile substitution: baselines] ->
  10-fold subprofile cross-validation (MoA, target; both mAP definitions) -> copairs mAP -> truth recovery
  on the truth-selected features -> 2-D map.
``already_normalized=True`` (an imported table normalised upstream) skips the variant-feature and MAD steps.
A step that leaves no feature raises a one-line :class:`UserError` naming the step and its likely cause.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpldm_core.errors import UserError
from cpldm_core.evaluation import copairs_metrics, crossval, report
from cpldm_core.evaluation.config import EvaluateConfig
from cpldm_core.evaluation.feature_select import drop_and_clip_outliers, select_features
from cpldm_core.evaluation.harmony import batch_silhouette, harmony_correct, single_batch_fraction
from cpldm_core.evaluation.labels import LabelSet
from cpldm_core.evaluation.normalize import robust_mad_normalize, variant_features
from cpldm_core.evaluation.truth import compound_means, truth_recovery, truth_space_profiles
from storage_schemas.columns import COMPOUND, DMSO_JCP2022 as DMSO

log = logging.getLogger(__name__)
#: Warn when at least this share of compounds sits in one Harmony batch level (1.0 = fully confounded).
HARMONY_CONFOUNDED_WARN = 1.0



def control_rows(meta: pd.DataFrame) -> np.ndarray:
    """(n,) bool: DMSO / negative-control rows."""
    pert = meta["Metadata_pert_type"] if "Metadata_pert_type" in meta else pd.Series("trt", index=meta.index)
    return ((meta[COMPOUND].astype(str) == DMSO) | (pert.astype(str) == "negcon")).to_numpy()


@dataclass
class WellProfiles:
    """Processed well-level profiles of one data type.

    Attributes:
        values: (n, k) float32 normalised, feature-selected (Harmony-corrected for real-harmony) values, no NaN.
        features: the k selected feature names.
        normalized: (n, f) float32 values after normalisation and the outlier step (variant features, NaN kept).
        normalized_features: the f names of ``normalized``.
        is_control: (n,) bool DMSO rows.
        silhouette_before / silhouette_after: batch silhouette before / after Harmony (equal without it).
        single_batch_fraction: share of compounds in a single Harmony batch level (NaN without Harmony).
    """

    values: np.ndarray
    features: list[str]
    normalized: np.ndarray
    normalized_features: list[str]
    is_control: np.ndarray
    silhouette_before: float = float("nan")
    silhouette_after: float = float("nan")
    single_batch_fraction: float = float("nan")


def _none_left(step: str, label: str, cause: str) -> UserError:
    return UserError(f"{label}: no feature left after {step} ({cause})")


def process_wells(meta: pd.DataFrame, values: np.ndarray, names: list[str], cfg: EvaluateConfig, *,
                  harmony: bool = False, already_normalized: bool = False, label: str = "profiles",
                  silhouettes: bool = True) -> WellProfiles:
    """Normalise, drop outliers, select features and optionally Harmony-correct well-level profiles.

    Args:
        meta: n rows (Metadata_Plate, Metadata_Batch, Metadata_JCP2022, Metadata_pert_type; Metadata_Source for
            Harmony on sources). values: (n, F) raw features named ``names``.
        cfg: thresholds of the recipe. harmony: apply Harmony on ``cfg.harmony_batch_key``.
        already_normalized: the values are normalised upstream: skip the variant-feature and MAD steps.
        label: name used in messages (the data type).

    Returns:
        :class:`WellProfiles`.
    """
    values = np.array(values, dtype=np.float32, copy=True)
    values[~np.isfinite(values)] = np.nan
    names = list(names)
    if not names:
        raise UserError(f"{label}: the table has no feature column")
    is_control = control_rows(meta)
    plates = meta["Metadata_Plate"].fillna("NA").astype(str).to_numpy()
    if not already_normalized:
        if not is_control.any():
            raise UserError(f"{label}: no DMSO / negcon rows to normalise against; mark them with "
                            "Metadata_pert_type == 'negcon', or declare the table already normalised")
        if cfg.variant_features:
            variant = variant_features(values, plates, is_control, cfg.min_abs_coef_var)
            values, names = values[:, variant], [n for n, v in zip(names, variant) if v]
            if not names:
                raise _none_left("the variant-feature step", label,
                                 "no feature varies among the DMSO rows of every plate: a table normalised "
                                 "upstream has DMSO medians of 0; declare it already normalised")
        values, no_ctrl = robust_mad_normalize(values, plates, is_control, cfg.mad_epsilon)
        if no_ctrl:
            log.warning("%s: %d plate(s) without DMSO rows normalised against all their rows: %s",
                        label, len(no_ctrl), no_ctrl[:5])
        values[~np.isfinite(values)] = np.nan
    if cfg.outlier_threshold > 0:
        bounded, values = drop_and_clip_outliers(values, cfg.outlier_threshold)
        values, names = values[:, bounded], [n for n, b in zip(names, bounded) if b]
        if not names:
            raise _none_left("the outlier step", label,
                             f"every feature has a 99th percentile of |value| above {cfg.outlier_threshold:g} "
                             "DMSO robust SDs: DMSO rows missing or mislabelled, or raw values declared normalised")
    normalized, normalized_features = values, names
    if np.isnan(values).all():
        raise _none_left("normalisation", label, "every value is missing")
    why = (f"{len(names)} features in, operations {'+'.join(cfg.feature_ops)}: constant, mostly missing or "
           "highly correlated features")
    try:
        kept = select_features(values, names, cfg.feature_ops, cfg.na_cutoff, cfg.corr_threshold,
                               cfg.min_variance, cfg.feature_select_max_rows)
    except ValueError as exc:   # scikit-learn's VarianceThreshold raises when nothing passes
        raise _none_left("feature selection", label, f"{why}; {exc}") from None
    if len(kept) < 2:
        raise _none_left("feature selection" if not kept else "feature selection (1 left; >= 2 needed)", label,
                         why)
    idx = [names.index(k) for k in kept]
    selected = np.nan_to_num(values[:, idx], nan=0.0)  # 0 = the DMSO median after normalisation
    batches = meta["Metadata_Batch"].fillna("NA").astype(str).to_numpy()
    before = batch_silhouette(selected, batches, seed=cfg.seed) if silhouettes else float("nan")
    confounded = float("nan")
    if harmony:
        confounded = single_batch_fraction(meta, is_control, cfg.harmony_batch_key)
        if confounded >= HARMONY_CONFOUNDED_WARN:
            log.warning("%s: %.0f%% of compounds sit in a single %s: the Harmony batch key is confounded with "
                        "compounds, so Harmony removes compound effects with the batch effects", label,
                        100 * confounded, cfg.harmony_batch_key)
        selected = harmony_correct(selected, meta, cfg.harmony_batch_key, cfg.harmony_max_iter, cfg.seed,
                                   cfg.harmony_sigma)
    after = batch_silhouette(selected, batches, seed=cfg.seed) if (silhouettes and harmony) else before
    return WellProfiles(selected.astype(np.float32), kept, normalized, normalized_features, is_control,
                        before, after, confounded)


DOSE = "Metadata_dose"


def treatment_keys(meta: pd.DataFrame, is_control: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """Treatment id of every row: the compound, or ``<compound>@<dose>`` when treated rows carry a dose.

    Returns:
        ((n,) object ids, ``{treatment id: compound}`` when dose-aware else None).
    """
    compounds = meta[COMPOUND].astype(str).to_numpy()
    if DOSE not in meta or not meta.loc[~np.asarray(is_control, bool), DOSE].notna().any():
        return compounds, None
    dose = pd.to_numeric(meta[DOSE], errors="coerce").to_numpy()
    keys = np.array([c if not np.isfinite(d) else f"{c}@{d:g}" for c, d in zip(compounds, dose)], dtype=object)
    return keys, dict(zip(keys, compounds))


def expand_to_treatments(labels: LabelSet, treatments: np.ndarray, compound_of: dict) -> LabelSet:
    """A compound-level label set at treatment level: each treatment of a labelled compound takes its labels.

    Args:
        labels: compounds x labels. treatments: treatment ids (sorted). compound_of: treatment -> compound.
    """
    row = {c: i for i, c in enumerate(labels.compounds)}
    kept = np.array([t for t in treatments if compound_of.get(t, t) in row], dtype=object)
    membership = (labels.membership[[row[compound_of.get(t, t)] for t in kept]] if len(kept)
                  else np.zeros((0, len(labels.labels)), bool))
    return LabelSet(labels.task, kept, labels.labels, membership)


def heldout_profile_rows(meta: pd.DataFrame, split: pd.Series | None, heldout_batches: set | None,
                         is_control: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows that make a compound's treatment profile when seen compounds must be judged on unseen images.

    A ``seen`` compound's profile uses only its wells in held-out batches (batches the model never trained on,
    the paper's rule); unseen compounds use all their wells. A seen compound with no well in a held-out batch
    keeps all its wells (counted, so the report can say how many).

    Args:
        meta: n rows (Metadata_Batch, Metadata_JCP2022). split: compound -> seen/unseen (None: all seen).
        heldout_batches: Metadata_Batch values held out of training. is_control: (n,) DMSO rows.

    Returns:
        ((n,) bool rows to average, number of seen compounds that fell back on all their wells).
    """
    treat = ~np.asarray(is_control, dtype=bool)
    if not heldout_batches:
        return treat, 0
    compounds = meta[COMPOUND].astype(str).to_numpy()
    seen = (split.reindex(compounds).fillna("unseen").to_numpy() == "seen") if split is not None else \
        np.ones(len(meta), dtype=bool)
    in_heldout = meta["Metadata_Batch"].astype(str).isin(set(map(str, heldout_batches))).to_numpy()
    rows = treat & (~seen | in_heldout)
    covered = set(compounds[rows & seen])
    fallback = treat & seen & ~pd.Series(compounds).isin(covered).to_numpy()
    return rows | fallback, len(set(compounds[fallback]))


@dataclass
class TruthReference:
    """The truth profiles: compound ids (t,), (t, k) float32 profiles and the k common features."""

    compounds: np.ndarray
    profiles: np.ndarray
    features: list[str]


def truth_reference(meta: pd.DataFrame, values: np.ndarray, names: list[str], cfg: EvaluateConfig
                    ) -> TruthReference:
    """Treatment profiles of the interventional truth dataset, on the features the recipe selects on it.

    Args:
        meta, values, names: the well-level rows of the ``truth`` dataset (Metadata_Plate = draw, DMSO per draw).
    """
    processed = process_wells(meta, values, names, cfg, label="truth", silhouettes=False)
    ids, profiles = truth_space_profiles(meta, values, names, processed.features, processed.is_control,
                                         ~processed.is_control, cfg.outlier_threshold, cfg.mad_epsilon)
    return TruthReference(ids, profiles, processed.features)


@dataclass
class DataTypeResult:
    """Everything one data type's evaluation produces (long tables; the pipeline adds ``data_type``/``run``).

    Attributes:
        results: [task, query_split, fold, metric, value, n_queries] (fold -1 = not per fold).
        copairs: [analysis, query_split, group, mean_average_precision, corrected_p_value, below_corrected_p].
        recovery: [Metadata_JCP2022, query_split, pearson_r, spearman_r] (empty without truth).
        embedding: [x, y, Metadata_JCP2022, Metadata_Source, Metadata_Batch, Metadata_moa].
        wells: the processed :class:`WellProfiles`. compounds / profiles: treatment profiles (m,), (m, k).
        info: counts for the log and the unit marker.
    """

    results: pd.DataFrame
    copairs: pd.DataFrame
    recovery: pd.DataFrame
    embedding: pd.DataFrame
    wells: WellProfiles
    compounds: np.ndarray
    profiles: np.ndarray
    info: dict = field(default_factory=dict)


def substitute_profiles(compounds: np.ndarray, profiles: np.ndarray, source_of: dict[str, str]
                        ) -> tuple[np.ndarray, int]:
    """Profiles where compound c takes the profile of ``source_of[c]`` (zeros = DMSO-like when it has none).

    Returns:
        ((m, k) float32, number of compounds without a usable source).
    """
    pos = {c: i for i, c in enumerate(compounds)}
    out = np.zeros_like(profiles)
    missing = 0
    for i, c in enumerate(compounds):
        src = source_of.get(c)
        if src in pos:
            out[i] = profiles[pos[src]]
        else:
            missing += 1
    return out, missing


def evaluate_wells(meta: pd.DataFrame, values: np.ndarray, names: list[str], label_sets: dict[str, LabelSet],
                   cfg: EvaluateConfig, *, data_type: str = "profiles", split: pd.Series | None = None,
                   moa_of: pd.Series | None = None, harmony: bool = False, already_normalized: bool = False,
                   profile_rows: np.ndarray | None = None, substitute: dict[str, str] | None = None,
                   truth: TruthReference | None = None, aggregate=None) -> DataTypeResult:
    """The whole recipe for one data type.

    Args:
        meta: n well-level rows (Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_JCP2022,
            Metadata_pert_type). values: (n, F) raw features. names: the F feature names.
        label_sets: ``{"moa": LabelSet, "target": LabelSet}``; every labelled compound must have a profile.
        cfg: the evaluation config. data_type: name for messages.
        split: compound -> seen/unseen (None: every compound is ``seen``).
        moa_of: compound -> MoA for the map colours.
        harmony: Harmony-correct the wells (real-harmony). already_normalized: skip variant features and MAD.
        profile_rows: (n,) bool rows averaged into treatment profiles (default: every treatment row).
        substitute: compound -> compound whose profile it takes (the chemistry-nn baseline).
        truth: the truth reference; adds per-compound truth recovery.
        aggregate: optional ``(compounds (n,), values (n, k), keep (n,)) -> (ids, (m, k))`` mean per compound
            (the pipeline passes DuckDB's); default pandas.

    Returns:
        :class:`DataTypeResult`.
    """
    wells = process_wells(meta, values, names, cfg, harmony=harmony, already_normalized=already_normalized,
                          label=data_type)
    keep = (~wells.is_control) if profile_rows is None else (np.asarray(profile_rows, bool) & ~wells.is_control)
    ids_all = meta[COMPOUND].astype(str).to_numpy()
    keys, compound_of = treatment_keys(meta, wells.is_control)
    compounds, profiles = (aggregate or compound_means)(keys, wells.values, keep)
    n_substituted_missing = 0
    if substitute is not None:
        profiles, n_substituted_missing = substitute_profiles(compounds, profiles, substitute)
    position = {c: i for i, c in enumerate(compounds)}
    dose_aware = compound_of is not None
    if dose_aware:   # rows are treatments (compound x dose): labels and splits follow the compound
        label_sets = {task: expand_to_treatments(ls, compounds, compound_of) for task, ls in label_sets.items()}
        log.info("%s: %d treatments (compound x dose) of %d compounds; not-same-compound references", data_type,
                 len(compounds), len(set(compound_of.values())))

    def split_of(ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=object)
        if dose_aware:
            ids = np.array([compound_of.get(i, i) for i in ids], dtype=object)
        if split is None:
            return np.full(len(ids), "seen", dtype=object)
        return split.reindex(ids).fillna("unseen").to_numpy()

    rows = []
    for task, labels in label_sets.items():
        if len(labels.labels) == 0:
            log.warning("%s %s: no label has enough compounds; skipped", data_type, task)
            continue
        missing = [c for c in labels.compounds if c not in position]
        if missing:
            raise UserError(f"{data_type}: {len(missing)} labelled compound(s) have no profile, e.g. {missing[:3]}")
        rows_idx = np.array([position[c] for c in labels.compounds])
        groups = np.array([compound_of[c] for c in labels.compounds], dtype=object) if dose_aware else None
        res = crossval.cross_validate(profiles[rows_idx], labels, split_of(labels.compounds), cfg.n_folds,
                                      cfg.n_references, cfg.sign_consistency, cfg.seed, cfg.reference_pool,
                                      cfg.score_chunk, groups=groups)
        rows.append(res.assign(task=task))
    results = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=crossval.RESULT_COLUMNS + ["task"])
    n = len(wells.values)
    extra = [{"task": "batch", "query_split": "all", "fold": -1, "metric": "batch-silhouette",
              "value": wells.silhouette_after, "n_queries": n},
             {"task": "batch", "query_split": "all", "fold": -1, "metric": "batch-silhouette-before-correction",
              "value": wells.silhouette_before, "n_queries": n}]
    if dose_aware:
        extra.append({"task": "profile", "query_split": "all", "fold": -1,
                      "metric": "dose-aware-treatments-nsc", "value": float(len(compounds)),
                      "n_queries": len(set(compound_of.values()))})
    if harmony:
        extra.append({"task": "batch", "query_split": "all", "fold": -1,
                      "metric": "compounds-in-a-single-harmony-batch", "value": wells.single_batch_fraction,
                      "n_queries": int(len(set(ids_all[~wells.is_control])))})
    moa_of = pd.Series(dtype=object) if moa_of is None else moa_of[~moa_of.index.duplicated()]

    copairs_frames = []
    if cfg.copairs:
        act = copairs_metrics.phenotypic_activity(wells.values, keys, wells.is_control, cfg.copairs_null_size,
                                                  cfg.seed)
        act = act.assign(query_split=split_of(act[COMPOUND].to_numpy()))
        copairs_frames.append(pd.DataFrame({"analysis": "activity", "query_split": act["query_split"],
                                            "group": act[COMPOUND], **{c: act[c] for c in (
                                                "mean_average_precision", "corrected_p_value",
                                                "below_corrected_p")}}))
        moa_set = label_sets.get("moa")
        for name in crossval.SPLITS if moa_set is not None else ():
            pick = split_of(moa_set.compounds) == name
            if pick.sum() < 4:
                continue
            ids = moa_set.compounds[pick]
            cons = copairs_metrics.moa_consistency(profiles[[position[c] for c in ids]],
                                                   moa_set.labels[moa_set.membership[pick].argmax(axis=1)],
                                                   cfg.copairs_null_size, cfg.seed)
            copairs_frames.append(pd.DataFrame({"analysis": "consistency", "query_split": name,
                                                "group": cons["Metadata_moa"], **{c: cons[c] for c in (
                                                    "mean_average_precision", "corrected_p_value",
                                                    "below_corrected_p")}}))
    cp = pd.concat(copairs_frames, ignore_index=True) if copairs_frames else pd.DataFrame(
        columns=["analysis", "query_split", "group", "mean_average_precision", "corrected_p_value",
                 "below_corrected_p"])
    for (analysis, name), group in cp.groupby(["analysis", "query_split"]):
        task = "activity" if analysis == "activity" else "moa"
        extra.append({"task": task, "query_split": name, "fold": -1, "metric": f"copairs-mAP-{analysis}",
                      "value": float(group["mean_average_precision"].mean()), "n_queries": len(group)})
        extra.append({"task": task, "query_split": name, "fold": -1, "metric": f"copairs-fraction-{analysis}",
                      "value": float(group["below_corrected_p"].astype(bool).mean()), "n_queries": len(group)})

    recovery = pd.DataFrame(columns=[COMPOUND, "query_split", "pearson_r", "spearman_r"])
    if truth is not None:
        transform = None
        if harmony:
            def transform(x):
                return harmony_correct(x, meta, cfg.harmony_batch_key, cfg.harmony_max_iter, cfg.seed,
                                       cfg.harmony_sigma)
        clip = cfg.outlier_threshold
        if already_normalized:   # normalised upstream: the common features are used as they are
            pos_of = {nm: i for i, nm in enumerate(names)}
            tv = np.asarray(values, np.float32)[:, [pos_of[f] for f in truth.features]]
            tv = np.clip(tv, -clip, clip) if clip > 0 else tv
            tv = transform(np.nan_to_num(tv)) if transform else tv
            t_ids, t_prof = compound_means(ids_all, tv, keep)
        else:
            t_ids, t_prof = truth_space_profiles(meta, values, names, truth.features, wells.is_control, keep, clip,
                                                 cfg.mad_epsilon, transform)
        if substitute is not None:
            t_prof, _ = substitute_profiles(t_ids, t_prof, substitute)
        recovery = truth_recovery(t_ids, t_prof, truth.compounds, truth.profiles, groups=split_of(t_ids))
        recovery.insert(1, "query_split", split_of(recovery[COMPOUND].to_numpy()))
        for name, group in recovery.groupby("query_split"):
            for metric, col in (("truth-pearson-mean", "pearson_r"), ("truth-spearman-mean", "spearman_r")):
                extra.append({"task": "truth", "query_split": name, "fold": -1, "metric": metric,
                              "value": float(group[col].mean()), "n_queries": len(group)})

    rng = np.random.default_rng([cfg.seed, 7])
    pick = np.sort(rng.choice(n, size=min(cfg.embedding_max_points, n), replace=False))
    xy = report.compute_embedding(wells.values[pick], cfg.embedding, cfg.seed)
    emb = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], COMPOUND: ids_all[pick],
                        "Metadata_Source": meta["Metadata_Source"].astype(str).to_numpy()[pick],
                        "Metadata_Batch": meta["Metadata_Batch"].astype(str).to_numpy()[pick]})
    emb["Metadata_moa"] = moa_of.reindex(emb[COMPOUND]).to_numpy()
    emb.loc[wells.is_control[pick], "Metadata_moa"] = "DMSO"

    results = pd.concat([results, pd.DataFrame(extra)], ignore_index=True)
    results = results.astype({"fold": "int32", "n_queries": "int32", "value": "float64"})
    info = {"wells": int(n), "compounds": int(len(compounds)), "features": len(wells.features),
            "profile_wells": int(keep.sum())}
    if substitute is not None:
        info["compounds_without_neighbour"] = n_substituted_missing
    return DataTypeResult(results, cp, recovery, emb, wells, compounds, profiles, info)
