"""``cpldm evaluate``: subprofile MoA / target prediction for every data type, statistics and a report.

Recipe (one unit of work per data type, committed; a rerun redoes only uncommitted data types):
  discover data types (``features_well`` datasets: ``real`` -> real + real-harmony; each generation run ->
  ``c-aware-N<draws>`` / ``non-c-aware-N<draws>`` from ``synthetic/<run>/config.json``)
  -> labels (annotation tables, or ``--annotations FILE`` joined on InChIKey) on the compounds profiled in
  every data type
  -> per data type: DuckDB reads its well-level rows -> features variant among DMSO rows -> MAD normalisation vs
  DMSO per plate (a synthetic run is one "plate") -> outlier drop/clip -> pycytominer feature selection ->
  [Harmony] -> DuckDB mean per compound (the g-estimate for synthetic draws) -> 10-fold subprofile
  cross-validation (MoA, target) -> copairs mAP -> truth recovery -> 2-D map
  -> results.parquet, ANOVA/Tukey, summary, figures, report.html.
"""
from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.evaluation import causal, copairs_metrics, crossval, report
from cpldm_core.evaluation.config import PRESETS, EvaluateConfig
from cpldm_core.evaluation.feature_select import drop_and_clip_outliers, select_features
from cpldm_core.evaluation.harmony import batch_silhouette, harmony_correct
from cpldm_core.evaluation.labels import LabelSet, hub_annotations, moa_labels, target_labels
from cpldm_core.evaluation.normalize import robust_mad_normalize, variant_features
from cpldm_core.evaluation.statistics import compare_data_types
from pipelines.storage import Lake
from storage_schemas.columns import DMSO_JCP2022, FEATURE_COLUMNS

log = logging.getLogger(__name__)

STAGE = "evaluate"
COMPOUND = "Metadata_JCP2022"
REAL = "real"
HARMONY = "real-harmony"
#: generation model kind -> data type prefix (METHOD.md: SCM-conditioned = confounder-aware).
KIND_NAMES = {"scm": "c-aware", "scm-free": "non-c-aware"}
META_COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", COMPOUND,
                "Metadata_pert_type")
TASKS = ("moa", "target")


def stage_name(run: str) -> str:
    return f"{STAGE}-{run}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---------------------------------------------------------------------------------------------- discovery
def _find(obj, keys: tuple[str, ...]):
    """First value of any of ``keys`` in a nested dict (generation config layouts differ by version)."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj and not isinstance(obj[key], dict):
                return obj[key]
        for value in obj.values():
            found = _find(value, keys)
            if found is not None:
                return found
    return None


def synthetic_data_type(lake: Lake, gen_run: str) -> str:
    """Data type name of a generation run: ``c-aware-N10`` (scm) / ``non-c-aware-N10`` (scm-free)."""
    kind, draws = None, None
    rel = f"synthetic/{gen_run}/config.json"
    if lake.exists(rel):
        cfg = lake.read_json(rel)
        kind, draws = _find(cfg, ("model_kind", "kind")), _find(cfg, ("draws", "n_draws"))
    if kind is None or draws is None:  # fall back on the conventional run name "<kind>-N<draws>"
        match = re.fullmatch(r"(scm-free|scm)(?:-.*)?-N(\d+)", gen_run)
        if not match:
            raise UserError(f"generation run '{gen_run}': {lake.uri_of(rel)} does not say the model kind and "
                            "draws, and the run name is not '<scm|scm-free>-N<draws>'")
        kind, draws = kind or match.group(1), draws or int(match.group(2))
    if kind not in KIND_NAMES:
        raise UserError(f"{lake.uri_of(rel)}: model kind {kind!r} is not one of {', '.join(KIND_NAMES)}")
    return f"{KIND_NAMES[kind]}-N{int(draws)}"


def discover(lake: Lake, cfg: EvaluateConfig) -> dict[str, str]:
    """``{data_type: features dataset}`` for every data type found (restricted to ``cfg.data_types``)."""
    root = "features/well"
    datasets = sorted(p.rsplit("dataset=", 1)[1] for p in lake.ls(root) if "dataset=" in p)
    if not datasets:
        raise UserError(f"no features_well tables under {lake.uri_of(root)}; run `cpldm profile` first")
    found: dict[str, str] = {}
    for ds in datasets:
        if ds == REAL:
            found[REAL] = REAL
            found[HARMONY] = REAL
        else:
            name = synthetic_data_type(lake, ds)
            if name in found:
                name = f"{name}-{ds}"  # two runs of the same kind and N: keep both, named by run
            found[name] = ds
    if cfg.data_types:
        unknown = [d for d in cfg.data_types if d not in found]
        if unknown:
            raise UserError(f"data type(s) {unknown} not in the lake; found {sorted(found)}")
        found = {d: found[d] for d in cfg.data_types}
    return found


# ---------------------------------------------------------------------------------------------- reading
def _connect(lake: Lake):
    from pipelines import sql
    con, views = sql.connect(lake, read_only=False)
    return con, set(views)


def feature_names(con, dataset: str) -> list[str]:
    cols = con.execute("SELECT * FROM features_well WHERE dataset = ? LIMIT 0", [dataset]).df().columns
    pattern = re.compile(FEATURE_COLUMNS)
    return [c for c in cols if pattern.fullmatch(c)]


def read_wells(con, dataset: str) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Well-level rows of ``dataset``: (metadata frame, (n, f) float32 features, feature names).

    Rows are ordered (plate, well, draw) so results do not depend on Parquet part order.
    """
    names = feature_names(con, dataset)
    if not names:
        raise UserError(f"features_well dataset={dataset} has no feature columns")
    meta_cols = ", ".join(f'CAST("{c}" AS VARCHAR) AS "{c}"' for c in META_COLUMNS)
    feats = ", ".join(f'CAST("{c}" AS FLOAT) AS "{c}"' for c in names)
    table = con.execute(
        f"SELECT {meta_cols}, {feats} FROM features_well WHERE dataset = ? "
        "ORDER BY Metadata_Plate, Metadata_Well, Metadata_Draw NULLS FIRST, Metadata_Source, Metadata_Batch",
        [dataset]).arrow()
    if hasattr(table, "read_all"):
        table = table.read_all()
    meta = table.select(list(META_COLUMNS)).to_pandas()
    values = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in names]).astype(
        np.float32, copy=False) if len(table) else np.zeros((0, len(names)), np.float32)
    return meta, values, names


def profiled_compounds(con, dataset: str) -> set[str]:
    rows = con.execute("SELECT DISTINCT CAST(Metadata_JCP2022 AS VARCHAR) FROM features_well WHERE dataset = ? "
                       "AND Metadata_JCP2022 <> ? AND coalesce(Metadata_pert_type, 'trt') <> 'negcon'",
                       [dataset, DMSO_JCP2022]).fetchall()
    return {r[0] for r in rows}


def treatment_profiles(con, meta: pd.DataFrame, values: np.ndarray, names: list[str], keep: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """DuckDB mean of well rows per compound (real: replicate wells; synthetic: draws = the g-estimate).

    Returns: (compound ids sorted, (n_compounds, f) float32).
    """
    frame = pd.DataFrame(values[keep], columns=[f"f{i}" for i in range(len(names))])
    frame.insert(0, COMPOUND, meta[COMPOUND].to_numpy()[keep])
    con.register("eval_wells", frame)
    aggs = ", ".join(f"CAST(avg(f{i}) AS FLOAT) AS f{i}" for i in range(len(names)))
    out = con.execute(f"SELECT {COMPOUND}, {aggs} FROM eval_wells GROUP BY {COMPOUND} ORDER BY {COMPOUND}").df()
    con.unregister("eval_wells")
    return out[COMPOUND].to_numpy(dtype=object), out.drop(columns=COMPOUND).to_numpy(dtype=np.float32)


# ---------------------------------------------------------------------------------------------- inputs
def load_labels(lake: Lake, cfg: EvaluateConfig, views: set[str], annotations: str | None
                ) -> pd.DataFrame:
    """[Metadata_JCP2022, Metadata_moa, Metadata_target] annotations (NaN where unknown)."""
    if annotations:
        from pathlib import Path
        path = Path(annotations)
        if not path.exists():
            raise UserError(f"--annotations {path}: file not found")
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            sep = "\t" if path.suffixes and path.suffixes[0] in (".tsv", ".txt") else ","
            table = pd.read_csv(path, sep=sep, low_memory=False)
        if "compounds" not in views:
            raise UserError("--annotations needs the `compounds` table (JCP2022 -> InChIKey); run `cpldm catalog`")
        compounds = lake.read_named("compounds").to_pandas()
        try:
            return hub_annotations(table, compounds, source=str(path), prefix14=cfg.inchikey_prefix14)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    frames = []
    if "annotations_moa" in views:
        frames.append(lake.read_named("annotations_moa").to_pandas()[[COMPOUND, "Metadata_moa"]])
    if "annotations_target" in views:
        t = lake.read_named("annotations_target").to_pandas()[[COMPOUND, "Metadata_target"]]
        frames.append(t.groupby(COMPOUND)["Metadata_target"].agg(lambda s: "|".join(sorted(set(s)))).reset_index())
    if not frames:
        raise UserError("no annotations: the lake has no annotations_moa/annotations_target tables; "
                        "pass --annotations FILE (Repurposing Hub style, joined on InChIKey)")
    out = frames[0]
    for f in frames[1:]:
        out = out.merge(f, on=COMPOUND, how="outer")
    for col in ("Metadata_moa", "Metadata_target"):
        if col not in out:
            out[col] = np.nan
    return out


def load_split(lake: Lake, views: set[str]) -> pd.Series | None:
    if "split_compounds" not in views:
        return None
    frame = lake.read_named("split_compounds").to_pandas()
    return frame.set_index(COMPOUND)["Metadata_CompoundSplit"].astype(str)


def load_truth(lake: Lake, views: set[str]) -> pd.DataFrame | None:
    if "truth_compounds" not in views:
        return None
    frame = lake.read_named("truth_compounds").to_pandas()
    cols = causal.truth_columns(frame)
    return frame.set_index(COMPOUND)[cols] if len(cols) >= 2 else None


def build_label_sets(ann: pd.DataFrame, profiled: list[str], split: pd.Series | None, cfg: EvaluateConfig
                     ) -> tuple[dict[str, LabelSet], pd.DataFrame]:
    excluded = []
    usable = profiled
    if split is not None:
        missing = sorted(set(profiled) - set(split.index))
        usable = [c for c in profiled if c in split.index]
        for task in TASKS:
            excluded.append(pd.DataFrame({COMPOUND: missing, "task": task, "reason": "not in split_compounds"}))
    moa, moa_excl = moa_labels(ann[[COMPOUND, "Metadata_moa"]], usable, cfg.min_compounds_moa)
    tgt, tgt_excl = target_labels(ann[[COMPOUND, "Metadata_target"]], usable, cfg.min_compounds_target)
    excl = pd.concat([*excluded, moa_excl, tgt_excl], ignore_index=True)
    return {"moa": moa, "target": tgt}, excl


# ---------------------------------------------------------------------------------------------- one unit
def _arrow(frame: pd.DataFrame, table_name: str) -> pa.Table:
    """``frame`` as an Arrow table typed by the schema of ``table_name`` (empty frames keep their types)."""
    import storage_schemas
    spec = storage_schemas.table_spec(table_name)
    frame = frame.reset_index(drop=True)
    fields = [f for f in spec.schema if f.name in frame.columns]
    return pa.table([pa.array(frame[f.name], type=f.type, from_pandas=True) for f in fields],
                    schema=pa.schema(fields))


def evaluate_data_type(lake: Lake, cfg: EvaluateConfig, data_type: str, dataset: str,
                       label_sets: dict[str, LabelSet], ann: pd.DataFrame, split: pd.Series | None,
                       truth: pd.DataFrame | None) -> dict:
    """One unit: profiles of ``data_type`` -> metrics; writes its parts and commits. Returns counts."""
    t0 = time.time()
    con, _ = _connect(lake)
    try:
        meta, values, names = read_wells(con, dataset)
        is_control = ((meta[COMPOUND] == DMSO_JCP2022) | (meta["Metadata_pert_type"] == "negcon")).to_numpy()
        values[~np.isfinite(values)] = np.nan
        plates = meta["Metadata_Plate"].fillna("NA").to_numpy()
        if cfg.variant_features:
            variant = variant_features(values, plates, is_control, cfg.min_abs_coef_var)
            values, names = values[:, variant], [n for n, v in zip(names, variant) if v]
            log.info("%s: %d features vary among the DMSO rows of every plate/run (%d constant dropped)",
                     data_type, len(names), int((~variant).sum()))
        values, no_ctrl = robust_mad_normalize(values, plates, is_control, cfg.mad_epsilon)
        if no_ctrl:
            log.warning("%s: %d plate(s)/run(s) without DMSO rows normalised against all their rows: %s",
                        data_type, len(no_ctrl), no_ctrl[:5])
        values[~np.isfinite(values)] = np.nan
        if cfg.outlier_threshold > 0:
            bounded, values = drop_and_clip_outliers(values, cfg.outlier_threshold)
            values, names = values[:, bounded], [n for n, b in zip(names, bounded) if b]
        kept = select_features(values, names, cfg.feature_ops, cfg.na_cutoff, cfg.corr_threshold,
                               cfg.min_variance, cfg.feature_select_max_rows)
        if len(kept) < 2:
            raise UserError(f"{data_type}: only {len(kept)} feature(s) survive feature selection")
        idx = [names.index(k) for k in kept]
        values = np.nan_to_num(values[:, idx], nan=0.0)  # 0 = the DMSO median after normalisation
        silhouette_before = batch_silhouette(values, meta["Metadata_Batch"].fillna("NA"), seed=cfg.seed)
        if data_type == HARMONY:
            values = harmony_correct(values, meta, cfg.harmony_batch_key, cfg.harmony_max_iter, cfg.seed,
                                     cfg.harmony_sigma)
        silhouette = batch_silhouette(values, meta["Metadata_Batch"].fillna("NA"), seed=cfg.seed)
        compounds, profiles = treatment_profiles(con, meta, values, kept, ~is_control)
    finally:
        con.close()
    position = {c: i for i, c in enumerate(compounds)}
    split_of = (lambda ids: split.reindex(ids).fillna("unseen").to_numpy()) if split is not None else \
        (lambda ids: np.full(len(ids), "seen", dtype=object))
    rows = []
    for task, labels in label_sets.items():
        if len(labels.labels) == 0:
            log.warning("%s %s: no label has enough compounds; skipped", data_type, task)
            continue
        rows_idx = np.array([position[c] for c in labels.compounds])
        res = crossval.cross_validate(profiles[rows_idx], labels, split_of(labels.compounds), cfg.n_folds,
                                      cfg.n_references, cfg.sign_consistency, cfg.seed, cfg.reference_pool,
                                      cfg.score_chunk)
        rows.append(res.assign(task=task))
    results = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=crossval.RESULT_COLUMNS + ["task"])
    extra = [{"task": "batch", "query_split": "all", "fold": -1, "metric": "batch-silhouette",
              "value": silhouette, "n_queries": len(values)},
             {"task": "batch", "query_split": "all", "fold": -1, "metric": "batch-silhouette-before-correction",
              "value": silhouette_before, "n_queries": len(values)}]
    moa_of = ann.set_index(COMPOUND)["Metadata_moa"] if "Metadata_moa" in ann else pd.Series(dtype=str)
    moa_of = moa_of[~moa_of.index.duplicated()]

    copairs_frames = []
    if cfg.copairs:
        act = copairs_metrics.phenotypic_activity(values, meta[COMPOUND].to_numpy(), is_control,
                                                  cfg.copairs_null_size, cfg.seed)
        act = act.assign(query_split=split_of(act[COMPOUND].to_numpy()))
        copairs_frames.append(pd.DataFrame({"analysis": "activity", "query_split": act["query_split"],
                                            "group": act[COMPOUND], **{c: act[c] for c in (
                                                "mean_average_precision", "corrected_p_value",
                                                "below_corrected_p")}}))
        moa_set = label_sets["moa"]
        for name in crossval.SPLITS:
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

    recovery = pd.DataFrame(columns=[COMPOUND, "query_split", "pearson_r"])
    if truth is not None:
        common = [c for c in compounds if c in truth.index]
        if len(common) >= 2 * cfg.truth_folds:
            r, _ = causal.truth_recovery(profiles[[position[c] for c in common]], truth.loc[common].to_numpy(),
                                         cfg.truth_folds, cfg.seed)
            recovery = pd.DataFrame({COMPOUND: common, "query_split": split_of(np.array(common, dtype=object)),
                                     "pearson_r": r})
            for name, group in recovery.groupby("query_split"):
                extra.append({"task": "truth", "query_split": name, "fold": -1, "metric": "truth-r-mean",
                              "value": float(group["pearson_r"].mean()), "n_queries": len(group)})

    rng = np.random.default_rng([cfg.seed, 7])
    pick = np.sort(rng.choice(len(values), size=min(cfg.embedding_max_points, len(values)), replace=False))
    xy = report.compute_embedding(values[pick], cfg.embedding, cfg.seed)
    emb = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], COMPOUND: meta[COMPOUND].to_numpy()[pick],
                        "Metadata_Source": meta["Metadata_Source"].to_numpy()[pick],
                        "Metadata_Batch": meta["Metadata_Batch"].to_numpy()[pick]})
    emb["Metadata_moa"] = moa_of.reindex(emb[COMPOUND]).to_numpy()
    emb.loc[emb[COMPOUND] == DMSO_JCP2022, "Metadata_moa"] = "DMSO"

    results = pd.concat([results, pd.DataFrame(extra)], ignore_index=True).assign(data_type=data_type)
    results = results.astype({"fold": "int32", "n_queries": "int32", "value": "float64"})
    part = _safe(data_type)
    run = cfg.run
    # parts first, marker last: an interrupted unit leaves no marker and is redone from scratch
    lake.write_table(f"eval_work/run={run}/{part}.parquet", _arrow(
        results[["data_type", "task", "query_split", "fold", "metric", "value", "n_queries"]], "eval_results"),
        "eval_results", config=cfg)
    lake.write_named("eval_copairs", _arrow(cp.assign(data_type=data_type), "eval_copairs"), config=cfg,
                     part=part, partition={"run": run})
    lake.write_named("eval_truth_recovery", _arrow(recovery.assign(data_type=data_type).astype(
        {"pearson_r": "float64"}), "eval_truth_recovery"), config=cfg, part=part, partition={"run": run})
    lake.write_named("eval_embedding", _arrow(emb.assign(data_type=data_type), "eval_embedding"), config=cfg,
                     part=part, partition={"run": run})
    info = {"data_type": data_type, "dataset": dataset, "wells": int(len(values)),
            "compounds": int(len(compounds)), "features": len(kept), "seconds": round(time.time() - t0, 2),
            "config": config_to_dict(cfg)}
    lake.commit_unit(stage_name(run), part, info)
    log.info("evaluate %s: %d wells, %d compounds, %d features in %.1f s", data_type, len(values),
             len(compounds), len(kept), time.time() - t0)
    return info


# ---------------------------------------------------------------------------------------------- driver
def _read_parts(lake: Lake, table: str, run: str) -> pd.DataFrame:
    rel = f"{lake.table_path(table)}/run={run}"
    if not lake.exists(rel):
        return pd.DataFrame()
    frame = lake.read_table(rel).to_pandas()
    return frame.drop(columns=[c for c in ("run",) if c in frame.columns])


def _config_changed(lake: Lake, cfg: EvaluateConfig) -> bool:
    stage = stage_name(cfg.run)
    current = config_to_dict(cfg)
    for unit in sorted(lake.committed_units(stage)):
        if lake.unit_info(stage, unit).get("config") != current:
            return True
    return False


def run(lake: Lake, config: EvaluateConfig | None = None, annotations: str | None = None) -> dict:
    """Evaluate every data type in the lake; write results, statistics and the report.

    Args:
        lake: the lake. config: stage config (default: the ``demo`` preset).
        annotations: Repurposing-Hub style file (InChIKey + moa/target) overriding the annotation tables.

    Returns:
        dict with ``run``, ``data_types`` (list), ``units_done_now``, ``units_skipped``, ``results_rows``,
        ``summary`` (DataFrame: data type x task x split, mean/SD of mAP and ROC-AUC over folds),
        ``truth_recovery`` (DataFrame: mean per-compound r per data type x split, empty without truth),
        ``copairs`` (DataFrame: copairs mAP per data type x analysis x split), ``anova``/``tukey`` (DataFrames),
        ``exclusions`` (int: compound x task rows excluded), ``report`` (URI of report.html),
        ``results`` (URI of results.parquet).
    """
    from pipelines.ray_runtime import ensure_ray

    cfg = config or PRESETS["demo"]
    if annotations:
        cfg = replace(cfg, annotations=str(annotations))
    if cfg.run != _safe(cfg.run):
        raise UserError(f"evaluation run name {cfg.run!r} may hold only letters, digits, '_', '.', '-'")
    ray = ensure_ray() if cfg.concurrency > 0 else None
    t0 = time.time()
    con, views = _connect(lake)
    try:
        data_types = discover(lake, cfg)
        per_dataset = {ds: profiled_compounds(con, ds) for ds in sorted(set(data_types.values()))}
    finally:
        con.close()
    ann = load_labels(lake, cfg, views, cfg.annotations or None)
    split = load_split(lake, views)
    truth = load_truth(lake, views)
    profiled = set.intersection(*per_dataset.values())
    only = sorted(set.union(*per_dataset.values()) - profiled)
    label_sets, exclusions = build_label_sets(ann, sorted(profiled), split, cfg)
    if only:
        exclusions = pd.concat([exclusions] + [pd.DataFrame({COMPOUND: only, "task": t,
                                                             "reason": "not profiled in every data type"})
                                               for t in TASKS], ignore_index=True)
    log.info("evaluate %s: data types %s; MoA %d compounds / %d labels, target %d compounds / %d labels",
             cfg.run, list(data_types), len(label_sets["moa"].compounds), len(label_sets["moa"].labels),
             len(label_sets["target"].compounds), len(label_sets["target"].labels))
    stage = stage_name(cfg.run)
    if _config_changed(lake, cfg):
        log.info("evaluate %s: config changed since the committed units; recomputing all data types", cfg.run)
        lake.reset_stage(stage)
    done = lake.committed_units(stage)
    todo = [(dt, ds) for dt, ds in data_types.items() if _safe(dt) not in done]
    args = (label_sets, ann, split, truth)
    if ray is None:
        for dt, ds in todo:
            evaluate_data_type(lake, cfg, dt, ds, *args)
    elif todo:
        task = ray.remote(evaluate_data_type).options(num_cpus=cfg.num_cpus)
        shared = [ray.put(a) for a in args]
        pending, waiting = [], list(todo)
        while waiting or pending:
            while waiting and len(pending) < cfg.concurrency:
                dt, ds = waiting.pop(0)
                pending.append(task.remote(lake, cfg, dt, ds, *shared))
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
    # --- combine (always recomputed from the committed parts: cheap and deterministic)
    parts = [lake.read_table(f"eval_work/run={cfg.run}/{_safe(dt)}.parquet").to_pandas() for dt in data_types]
    results = pd.concat(parts, ignore_index=True).assign(run=cfg.run)
    results = results[["run", "data_type", "task", "query_split", "fold", "metric", "value", "n_queries"]]
    results = results.sort_values(["data_type", "task", "query_split", "metric", "fold"], kind="stable")
    lake.write_named("eval_results", _arrow(results, "eval_results"), config=cfg,
                     part="results", partition={"run": cfg.run})
    anova, tukey = compare_data_types(results, alpha=cfg.alpha)
    summary = report.summarise(results)
    copairs = _read_parts(lake, "eval_copairs", cfg.run)
    recovery = _read_parts(lake, "eval_truth_recovery", cfg.run)
    embedding = _read_parts(lake, "eval_embedding", cfg.run)
    copairs = copairs[copairs["data_type"].isin(list(data_types))] if len(copairs) else copairs
    recovery = recovery[recovery["data_type"].isin(list(data_types))] if len(recovery) else recovery
    embedding = embedding[embedding["data_type"].isin(list(data_types))] if len(embedding) else embedding
    for name, frame in (("eval_summary", summary), ("eval_anova", anova), ("eval_tukey", tukey),
                        ("eval_exclusions", exclusions)):
        lake.write_named(name, _arrow(frame, name), config=cfg, part=name.removeprefix("eval_"), partition={"run": cfg.run})
    copairs_summary = (copairs.groupby(["data_type", "analysis", "query_split"])
                       .agg(mAP=("mean_average_precision", "mean"),
                            fraction_significant=("below_corrected_p", "mean"), n=("group", "size")).reset_index()
                       if len(copairs) else pd.DataFrame())
    recovery_summary = (recovery.groupby(["data_type", "query_split"])["pearson_r"].agg(["mean", "median", "count"])
                        .reset_index() if len(recovery) else pd.DataFrame())
    report_uri = (write_report(lake, cfg, summary, anova, tukey, copairs_summary, exclusions, recovery, embedding)
                  if cfg.report else None)
    log.info("evaluate %s: done in %.1f s -> %s", cfg.run, time.time() - t0, report_uri)
    return {"run": cfg.run, "data_types": list(data_types), "units_done_now": len(todo),
            "units_skipped": len(data_types) - len(todo), "results_rows": len(results), "summary": summary,
            "truth_recovery": recovery_summary, "copairs": copairs_summary, "anova": anova, "tukey": tukey,
            "exclusions": len(exclusions), "report": report_uri,
            "results": lake.uri_of(f"eval/run={cfg.run}/results.parquet")}


def write_report(lake: Lake, cfg: EvaluateConfig, summary, anova, tukey, copairs, exclusions, recovery,
                 embedding) -> str:
    """Figures to ``eval/<run>/figures/*.png``, CSV copies of the tables and ``eval/<run>/report.html``."""
    base = f"eval/{cfg.run}"
    figures = []

    def save(name: str, title: str, draw, *args) -> None:
        lake.write_bytes(f"{base}/figures/{name}.png", report.png_bytes(draw, *args))
        figures.append((title, f"figures/{name}.png"))

    for task in TASKS:
        if len(summary) and (summary["task"] == task).any():
            save(f"bars_{task}", f"{task}: mAP and ROC-AUC (mean +- SD over folds)", report.bar_chart, summary, task)
    if len(embedding):
        for key, column in (("compound", COMPOUND), ("batch", "Metadata_Batch"), ("moa", "Metadata_moa")):
            save(f"map_{key}", f"{cfg.embedding.upper()} of well-level profiles coloured by {key}",
                 report.embedding_figure, embedding, column)
    if recovery is not None and len(recovery):
        save("truth_recovery", "ground-truth recovery per compound", report.recovery_figure, recovery)
    for name, frame in (("summary", summary), ("tukey", tukey), ("anova", anova), ("exclusions", exclusions),
                        ("copairs", copairs)):
        lake.write_bytes(f"{base}/{name}.csv", frame.to_csv(index=False).encode())
    notes = []
    if not len(tukey):
        notes.append("Tukey HSD needs at least two data types with two folds each.")
    content = report.ReportContent(run=cfg.run, summary=summary, anova=anova, tukey=tukey, copairs=copairs,
                                   exclusions=exclusions, recovery=recovery, figures=figures, notes=notes)
    lake.write_bytes(f"{base}/report.html", report.render_html(content).encode())
    lake.write_config(base, cfg)
    return lake.uri_of(f"{base}/report.html")


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    from pipelines.cli import add_config_arguments

    p = sub.add_parser("evaluate", help="subprofile MoA/target prediction per data type, statistics, report",
                       description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PRESETS, EvaluateConfig)
    p.add_argument("--run", help="evaluation run name (default from config: 'default')")
    p.add_argument("--annotations", help="Repurposing Hub style file (InChIKey + moa/target), joined on InChIKey")
    p.add_argument("--data-types", help="comma-separated data types to evaluate (default: all found)")
    p.add_argument("--harmony-batch-key", choices=["batch", "source", "both"])
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from pipelines.cli import config_from_args, lake_from_args

    overrides = []
    if args.run:
        overrides.append(f"run={args.run}")
    if args.data_types:
        overrides.append(f"data_types={args.data_types}")
    if args.harmony_batch_key:
        overrides.append(f"harmony_batch_key={args.harmony_batch_key}")
    cfg = config_from_args(EvaluateConfig, PRESETS, args, overrides)
    lake = lake_from_args(args)
    lake.check_reachable()
    out = run(lake, cfg, annotations=args.annotations)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(out["summary"].to_string(index=False))
        if len(out["truth_recovery"]):
            print(out["truth_recovery"].to_string(index=False))
    print(f"results: {out['results']}\nreport:  {out['report']}")
    return 0
