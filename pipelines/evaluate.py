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
from cpldm_core.evaluation import crossval, recipe, report
from cpldm_core.evaluation.config import PAPER_MIN_COMPOUNDS, PRESETS, EvaluateConfig
from cpldm_core.evaluation.labels import LabelSet, hub_annotations, moa_labels, target_labels, threshold_report
from cpldm_core.evaluation.recipe import DOSE, TruthReference
from cpldm_core.evaluation.statistics import compare_data_types, paired_and_verdicts
from cpldm_core.evaluation.baselines import nearest_seen_neighbours
from cpldm_core.evaluation.truth import TRUTH_DATASET
from pipelines.gallery import gallery_figures
from pipelines.profile import _safe
from pipelines.profile_import import dataset_is_imported, dataset_is_normalized
from pipelines.storage import Lake
from storage_schemas.artifacts import EvalRun, artifact_dir, read_record, write_record
from storage_schemas.columns import COMPOUND, DMSO_JCP2022, FEATURE_COLUMNS

log = logging.getLogger(__name__)

STAGE = "evaluate"
REAL = "real"
HARMONY = "real-harmony"
#: real profiles averaged over every well, training batches included (the seen-query rule off).
REAL_ALL = "real-allwells"
#: baseline: each compound takes the real profile of its nearest seen neighbour by Tanimoto.
CHEM_NN = "chemistry-nn"
#: baseline: real crops encoded and decoded by the VAE (`cpldm vae-recon`), evaluated on the real arm's wells.
VAE_RECON = "vae-recon"
#: generation model kind -> data type prefix (METHOD.md: SCM-conditioned = confounder-aware).
KIND_NAMES = {"scm": "c-aware", "scm-free": "non-c-aware"}
#: simulator-as-generator runs (``cpldm generate --oracle``) -> data type prefix.
ORACLE_NAMES = {"c-aware": "oracle-c-aware", "scm-free": "oracle-scm-free"}
META_COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", COMPOUND,
                "Metadata_pert_type")
TASKS = ("moa", "target")


def stage_name(run: str) -> str:
    return f"{STAGE}-{run}"


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
    """Data type name of a generation run: ``c-aware-N10`` (scm) / ``non-c-aware-N10`` (scm-free), with
    ``-g<scale>`` when sampled with classifier-free guidance != 1; ``oracle-c-aware-N10`` / ``oracle-scm-free-N10``
    for the simulator used as the generator, ``oracle-c-aware-vae-N10`` when its images went through the VAE."""
    kind, draws = None, None
    rel = f"synthetic/{gen_run}/config.json"
    if lake.exists(rel):
        cfg = lake.read_json(rel)
        oracle, draws = _find(cfg, ("oracle",)), _find(cfg, ("draws", "n_draws"))
        if _find(cfg, ("model_kind",)) == VAE_RECON:   # the default run is "vae-recon"; another VAE's, its own
            return VAE_RECON if gen_run == VAE_RECON else f"{VAE_RECON}-{gen_run}"
        if oracle:
            if oracle not in ORACLE_NAMES or draws is None:
                raise UserError(f"{lake.uri_of(rel)}: oracle {oracle!r} (one of {', '.join(ORACLE_NAMES)}) "
                                f"with draws {draws!r}")
            through_vae = "-vae" if _find(cfg, ("oracle_vae",)) else ""   # a perfect latent generator
            return f"{ORACLE_NAMES[oracle]}{through_vae}-N{int(draws)}"
        kind = _find(cfg, ("model_kind", "kind"))
    if kind is None or draws is None:  # fall back on the conventional run name "<kind>-N<draws>"
        match = re.fullmatch(r"(scm-free|scm)(?:-.*)?-N(\d+)", gen_run)
        if not match:
            raise UserError(f"generation run '{gen_run}': {lake.uri_of(rel)} does not say the model kind and "
                            "draws, and the run name is not '<scm|scm-free>-N<draws>'")
        kind, draws = kind or match.group(1), draws or int(match.group(2))
    if kind not in KIND_NAMES:
        raise UserError(f"{lake.uri_of(rel)}: model kind {kind!r} is not one of {', '.join(KIND_NAMES)}")
    guidance = _find(cfg, ("guidance_scale",)) if lake.exists(rel) else None
    # classifier-free guidance != 1 is another arm: c-aware-N10-g2 (its counterpart non-c-aware-N10-g2)
    suffix = f"-g{float(guidance):g}" if guidance is not None and float(guidance) != 1.0 else ""
    return f"{KIND_NAMES[kind]}-N{int(draws)}{suffix}"


def discover(lake: Lake, cfg: EvaluateConfig, heldout: bool = False, fingerprints: bool = False
             ) -> dict[str, str]:
    """``{data_type: features dataset}`` for every data type found (restricted to ``cfg.data_types``).

    ``real`` gives real, real-harmony, real-allwells (when ``heldout``: the catalog holds out batches) and
    chemistry-nn (when ``fingerprints``: the lake has Morgan bits); the ``truth`` dataset gives none."""
    root = "features/well"
    datasets = sorted(p.rsplit("dataset=", 1)[1] for p in lake.ls(root) if "dataset=" in p)
    if not datasets:
        raise UserError(f"no features_well tables under {lake.uri_of(root)}; run `cpldm profile` first")
    found: dict[str, str] = {}
    for ds in datasets:
        if ds == TRUTH_DATASET:   # the interventional truth is the yardstick, never a data type
            continue
        if ds == REAL:
            found[REAL] = REAL
            found[HARMONY] = REAL
            if heldout:
                found[REAL_ALL] = REAL
            if fingerprints:
                found[CHEM_NN] = REAL
        elif dataset_is_imported(lake, ds):   # `cpldm profile import`: one data type named like the dataset
            found[ds] = ds
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
    columns = set(con.execute("SELECT * FROM features_well WHERE dataset = ? LIMIT 0", [dataset]).df().columns)
    extra = [DOSE] if DOSE in columns else []   # imported profiles with a dose: treatments = compound x dose
    meta_cols += "".join(f', CAST("{c}" AS DOUBLE) AS "{c}"' for c in extra)
    feats = ", ".join(f'CAST("{c}" AS FLOAT) AS "{c}"' for c in names)
    table = con.execute(
        f"SELECT {meta_cols}, {feats} FROM features_well WHERE dataset = ? "
        "ORDER BY Metadata_Plate, Metadata_Well, Metadata_Draw NULLS FIRST, Metadata_Source, Metadata_Batch",
        [dataset]).arrow()
    if hasattr(table, "read_all"):
        table = table.read_all()
    meta = table.select([*META_COLUMNS, *extra]).to_pandas()
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
        if cfg.annotation_key:   # the key column holds compound ids: join it like an InChIKey, on the ids
            if cfg.annotation_key not in table.columns:
                raise UserError(f"--annotation-key {cfg.annotation_key}: no such column in {path}; columns are "
                                f"{list(table.columns)[:12]}")
            from cpldm_core.evaluation.labels import INCHIKEY_COLUMNS
            table = table.drop(columns=[c for c in INCHIKEY_COLUMNS if c in table.columns])
            table = table.rename(columns={cfg.annotation_key: "InChIKey"})
            compounds = compounds.assign(Metadata_InChIKey=compounds[COMPOUND])
        try:
            return hub_annotations(table, compounds, source=str(path),
                                   prefix14=cfg.inchikey_prefix14 and not cfg.annotation_key)
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


def load_heldout_batches(lake: Lake, views: set[str]) -> set[str]:
    """Metadata_Batch values the catalog held out of training (``split_batches`` == heldout); empty without."""
    if "split_batches" not in views:
        return set()
    frame = lake.read_named("split_batches").to_pandas()
    return set(frame.loc[frame["Metadata_BatchSplit"].astype(str) == "heldout", "Metadata_Batch"].astype(str))


def load_fingerprints(lake: Lake, views: set[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(compound ids, (n, D) bool Morgan bits) of the lake's first Morgan bit encoder, or None."""
    if "embeddings" not in views:
        return None
    table = lake.read_named("embeddings", columns=["encoder", COMPOUND, "embedding"]).to_pandas()
    encoders = sorted(e for e in table["encoder"].astype(str).unique()
                      if e.startswith("morgan") and not e.endswith("-counts"))
    if not encoders:
        return None
    sub = table[table["encoder"].astype(str) == encoders[0]].drop_duplicates(COMPOUND)
    bits = np.stack([np.asarray(v) > 0 for v in sub["embedding"]]) if len(sub) else np.zeros((0, 1), bool)
    return sub[COMPOUND].astype(str).to_numpy(dtype=object), bits


def load_truth(lake: Lake, cfg: EvaluateConfig) -> TruthReference | None:
    """Truth profiles of the ``truth`` features dataset (same recipe as every data type), or None."""
    if not lake.exists(f"features/well/dataset={TRUTH_DATASET}"):
        return None
    con, _ = _connect(lake)
    try:
        meta, values, names = read_wells(con, TRUTH_DATASET)
    finally:
        con.close()
    truth = recipe.truth_reference(meta, values, names, cfg)
    log.info("truth: %d compounds on %d common features", len(truth.compounds), len(truth.features))
    return truth


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
    for task, minimum in (("moa", cfg.min_compounds_moa), ("target", cfg.min_compounds_target)):
        message, warn = threshold_report(ann, usable, task, minimum, PAPER_MIN_COMPOUNDS)
        (log.warning if warn else log.info)("labels %s", message)
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


def _profile_table(meta: pd.DataFrame, values: np.ndarray, features: list[str]) -> pa.Table:
    """Well metadata + float32 feature columns (a ``profiles_normalized`` / ``profiles_featselect`` part)."""
    cols = {c: pa.array(meta[c].astype(object).where(meta[c].notna(), None).to_numpy(), pa.string())
            for c in META_COLUMNS}
    cols.update({f: pa.array(values[:, j], pa.float32()) for j, f in enumerate(features)})
    return pa.table(cols)


def evaluate_data_type(lake: Lake, cfg: EvaluateConfig, data_type: str, dataset: str,
                       label_sets: dict[str, LabelSet], ann: pd.DataFrame, split: pd.Series | None,
                       truth: TruthReference | None, heldout: set | None = None,
                       neighbours: dict[str, str] | None = None) -> dict:
    """One unit: read the wells of ``dataset``, run the core recipe (:func:`recipe.evaluate_wells`), write its
    parts and commit. ``heldout``: held-out batches (seen compounds of real/real-harmony are profiled on them
    only); ``neighbours``: compound -> nearest seen compound (chemistry-nn). Returns counts."""
    t0 = time.time()
    con, _ = _connect(lake)
    try:
        meta, values, names = read_wells(con, dataset)

        def aggregate(ids, vals, keep):
            frame_meta = pd.DataFrame({COMPOUND: ids})
            return treatment_profiles(con, frame_meta, vals, [f"f{i}" for i in range(vals.shape[1])], keep)

        is_control = recipe.control_rows(meta)
        profile_rows, fallback = None, 0
        if (data_type in (REAL, HARMONY) or data_type.startswith(VAE_RECON)) and heldout:
            profile_rows, fallback = recipe.heldout_profile_rows(meta, split, heldout, is_control)
            log.info("%s: seen compounds profiled on %d held-out batch(es); %d seen compound(s) without a "
                     "held-out well keep all their wells", data_type, len(heldout), fallback)
        moa_of = ann.set_index(COMPOUND)["Metadata_moa"] if "Metadata_moa" in ann else None
        out = recipe.evaluate_wells(meta, values, names, label_sets, cfg, data_type=data_type, split=split,
                                    moa_of=moa_of, harmony=data_type == HARMONY, profile_rows=profile_rows,
                                    substitute=neighbours if data_type == CHEM_NN else None, truth=truth,
                                    aggregate=aggregate, already_normalized=dataset_is_normalized(lake, dataset))
    finally:
        con.close()
    results, cp, recovery, emb = out.results, out.copairs, out.recovery, out.embedding
    if profile_rows is not None:
        results = pd.concat([results, pd.DataFrame([{
            "task": "profile", "query_split": "seen", "fold": -1, "metric": "seen-compounds-without-heldout-wells",
            "value": float(fallback), "n_queries": int(len(out.compounds))}])], ignore_index=True)
    results = results.assign(data_type=data_type).astype({"fold": "int32", "n_queries": "int32",
                                                           "value": "float64"})
    values, compounds, kept = out.wells.values, out.compounds, out.wells.features
    part = _safe(data_type)
    run = cfg.run
    # parts first, marker last: an interrupted unit leaves no marker and is redone from scratch
    lake.write_table(f"eval_work/run={run}/{part}.parquet", _arrow(
        results[["data_type", "task", "query_split", "fold", "metric", "value", "n_queries"]], "eval_results"),
        "eval_results", config=cfg)
    lake.write_named("eval_copairs", _arrow(cp.assign(data_type=data_type), "eval_copairs"), config=cfg,
                     part=part, partition={"run": run})
    lake.write_named("eval_truth_recovery", _arrow(recovery.assign(data_type=data_type).astype(
        {"pearson_r": "float64", "spearman_r": "float64"}), "eval_truth_recovery"), config=cfg, part=part,
        partition={"run": run})
    lake.write_named("eval_embedding", _arrow(emb.assign(data_type=data_type), "eval_embedding"), config=cfg,
                     part=part, partition={"run": run})
    for table_name, vals, feats in (("profiles_normalized", out.wells.normalized, out.wells.normalized_features),
                                    ("profiles_featselect", out.wells.values, out.wells.features)):
        lake.write_named(table_name, _profile_table(meta, vals, feats), config=cfg, part="wells",
                         partition={"run": run, "data_type": part})
    info = {"data_type": data_type, "dataset": dataset, **out.info, "seconds": round(time.time() - t0, 2),
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


#: EvaluateConfig fields that choose resources or output formats, not results: changing them recomputes nothing.
RESOURCE_KEYS = ("run", "concurrency", "num_cpus", "score_chunk", "report")


def _science(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in RESOURCE_KEYS}


def eval_record(lake: Lake, cfg: EvaluateConfig, data_types: dict[str, str], truth: bool) -> EvalRun:
    """The EvalRun asked for: one input per data type (role = data type) naming the ProfileSet of its dataset,
    plus ``truth`` when the interventional truth is the yardstick. A dataset without a ProfileSet record is a
    one-line error naming `cpldm profile --dataset <name>`."""
    from pipelines.profile import read_profile_set
    from pipelines.storage import code_version

    inputs = {dt: read_profile_set(lake, ds).ref() for dt, ds in data_types.items()}
    if truth:
        inputs["truth"] = read_profile_set(lake, TRUTH_DATASET).ref()
    settings = config_to_dict(cfg)
    return EvalRun(id=cfg.run, inputs=inputs, config=_science(settings),
                   resources={k: settings[k] for k in RESOURCE_KEYS if k in settings}, code_version=code_version(),
                   data_types=tuple(data_types))


def _config_changed(lake: Lake, cfg: EvaluateConfig, planned: EvalRun | None = None) -> bool:
    """True when a committed unit was made with other science settings or from other profiles (the ProfileSet
    fingerprints of the stored EvalRun); resources (concurrency, CPUs) may differ."""
    stage = stage_name(cfg.run)
    current = _science(config_to_dict(cfg))
    done = sorted(lake.committed_units(stage))
    for unit in done:
        if _science(lake.unit_info(stage, unit).get("config") or {}) != current:
            return True
    rel = artifact_dir("EvalRun", cfg.run)
    if planned is not None and done and lake.exists(f"{rel}/_artifact.json"):
        stored = read_record(lake, rel, EvalRun, cfg.run)
        return any(role in stored.inputs and stored.inputs[role] != ref for role, ref in planned.inputs.items())
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
        ``paired`` (paired t / Wilcoxon, Holm-adjusted, every pair of data types), ``verdict`` (each arm vs real
        and vs its counterpart, in words),
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
        heldout = load_heldout_batches(lake, views)
        fingerprints = load_fingerprints(lake, views)
        data_types = discover(lake, cfg, heldout=bool(heldout), fingerprints=fingerprints is not None)
        per_dataset = {ds: profiled_compounds(con, ds) for ds in sorted(set(data_types.values()))}
    finally:
        con.close()
    ann = load_labels(lake, cfg, views, cfg.annotations or None)
    split = load_split(lake, views)
    truth = load_truth(lake, cfg)
    planned = eval_record(lake, cfg, data_types, truth is not None)   # every ProfileSet used, read up front
    if truth is not None:
        frame = pd.DataFrame(truth.profiles, columns=truth.features)
        frame.insert(0, COMPOUND, truth.compounds)
        lake.write_named("truth_profiles", pa.Table.from_pandas(frame, preserve_index=False), config=cfg,
                         part="truth", partition={"run": cfg.run})
    neighbours = None
    if CHEM_NN in data_types:
        ids, bits = fingerprints
        seen = (split.reindex(ids).fillna("unseen").to_numpy() == "seen") if split is not None else \
            np.ones(len(ids), dtype=bool)
        neighbours = nearest_seen_neighbours(ids, bits, seen)
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
    if _config_changed(lake, cfg, planned):
        log.info("evaluate %s: config or profiles changed since the committed units; recomputing all data types",
                 cfg.run)
        lake.reset_stage(stage)
    done = lake.committed_units(stage)
    todo = [(dt, ds) for dt, ds in data_types.items() if _safe(dt) not in done]
    args = (label_sets, ann, split, truth, heldout, neighbours)
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
    paired, verdict = paired_and_verdicts(results, recovery, REAL, cfg.alpha)
    for name, frame in (("eval_summary", summary), ("eval_anova", anova), ("eval_tukey", tukey),
                        ("eval_exclusions", exclusions), ("eval_paired", paired), ("eval_verdict", verdict)):
        lake.write_named(name, _arrow(frame, name), config=cfg, part=name.removeprefix("eval_"), partition={"run": cfg.run})
    copairs_summary = (copairs.groupby(["data_type", "analysis", "query_split"])
                       .agg(mAP=("mean_average_precision", "mean"),
                            fraction_significant=("below_corrected_p", "mean"), n=("group", "size")).reset_index()
                       if len(copairs) else pd.DataFrame())
    recovery_summary = report.summarise_recovery(recovery)
    report_uri = (write_report(lake, cfg, summary, anova, tukey, copairs_summary, exclusions, recovery, embedding,
                               paired, verdict) if cfg.report else None)
    write_record(lake, artifact_dir("EvalRun", cfg.run),
                 replace(planned, metrics=tuple(sorted(results["metric"].astype(str).unique()))))
    log.info("evaluate %s: done in %.1f s -> %s", cfg.run, time.time() - t0, report_uri)
    return {"run": cfg.run, "data_types": list(data_types), "units_done_now": len(todo),
            "units_skipped": len(data_types) - len(todo), "results_rows": len(results), "summary": summary,
            "truth_recovery": recovery_summary, "copairs": copairs_summary, "anova": anova, "tukey": tukey,
            "exclusions": len(exclusions), "report": report_uri, "paired": paired, "verdict": verdict,
            "results": lake.uri_of(f"eval/run={cfg.run}/results.parquet")}


def write_report(lake: Lake, cfg: EvaluateConfig, summary, anova, tukey, copairs, exclusions, recovery,
                 embedding, paired=None, verdict=None) -> str:
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
    paired = pd.DataFrame() if paired is None else paired
    verdict = pd.DataFrame() if verdict is None else verdict
    for name, frame in (("summary", summary), ("tukey", tukey), ("anova", anova), ("exclusions", exclusions),
                        ("copairs", copairs), ("paired", paired), ("verdict", verdict)):
        lake.write_bytes(f"{base}/{name}.csv", frame.to_csv(index=False).encode())
    notes = []
    if not len(tukey):
        notes.append("Tukey HSD needs at least two data types with two folds each.")
    content = report.ReportContent(run=cfg.run, summary=summary, anova=anova, tukey=tukey, copairs=copairs,
                                   exclusions=exclusions, recovery=recovery, figures=figures, notes=notes,
                                   paired=paired, verdict=verdict, gallery=gallery_figures(lake, cfg.run))
    lake.write_bytes(f"{base}/report.html", report.render_html(content).encode())
    lake.write_config(base, cfg)
    return lake.uri_of(f"{base}/report.html")


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = sub.add_parser("evaluate", help="subprofile MoA/target prediction per data type, statistics, report",
                       description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PRESETS, EvaluateConfig)
    p.add_argument("--run", type=lake_name, help="evaluation run name (default from config: 'default')")
    p.add_argument("--annotations", help="Repurposing Hub style file (InChIKey + moa/target), joined on InChIKey")
    p.add_argument("--annotation-key", metavar="COL", help="join --annotations on this column (compound ids) instead")
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
    if args.annotation_key:
        overrides.append(f"annotation_key={args.annotation_key}")
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
