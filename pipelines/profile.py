"""``cpldm profile``: segmentation + CellProfiler-compatible features of real or synthetic images, into Parquet.

Recipe (one streamed Ray Data execution per wave of units):

    inputs (catalog ``sites`` TIFFs | ``synthetic/<run>/images.zarr`` + ``synthetic_manifest``)
      -> units (real: plates; synthetic: generation blocks), skipping committed ones
      -> map_batches(SiteProfiler): read 5 channels -> segment -> measure -> rows (image, optional cells, rejects)
      -> per unit: features_image, features_well (mean over sites / one row per draw), [features_single_cell],
         rejects; then commit the unit, as soon as its last site is measured (the driver holds units in flight)
      -> features_treatment (mean over replicate wells / draws) recomputed from every committed well.

``cpldm profile import FILE --dataset NAME`` (:mod:`pipelines.profile_import`) brings CellProfiler / pycytominer /
JUMP profiles into the same tables.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa

import storage_schemas
from cpldm_core.configuration import check_name, config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.features import aggregate
from cpldm_core.features.config import PRESETS, ProfileConfig
from cpldm_core.features.site import feature_names, profile_site
from pipelines.ingest import unit_name
from pipelines.site_reader import SiteReader
from pipelines.storage import Lake
from storage_schemas.artifacts import (GenerationRun, InputRef, ProfileSet, artifact_dir, fingerprint_of,
                                       read_artifact, read_record, write_record)
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

log = logging.getLogger(__name__)

STAGE = "profile"
#: Part (file stem) of the treatment table: recomputed whole from the committed wells after every run.
TREATMENT_PART = "treatment"

#: Row kinds produced by :class:`SiteProfiler` (column ``Metadata_Level``).
LEVEL_IMAGE, LEVEL_CELL, LEVEL_REJECT = "image", "cell", "reject"

SITE_META = ("Metadata_SiteKey", "Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well",
             "Metadata_Site", "Metadata_JCP2022", "Metadata_pert_type", "Metadata_Draw")
_STRING_META = ("Metadata_SiteKey", "Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well",
                "Metadata_JCP2022", "Metadata_pert_type")
#: Metadata_Draw of real images inside Ray batches (nulls would make Arrow infer a null type in some batches).
NO_DRAW = -1


def marker_stage(dataset: str) -> str:
    return f"{STAGE}-{dataset}"


def _safe(text: str) -> str:
    """File-name safe: every character outside ``A-Za-z0-9._-`` becomes ``_`` (ingest's rule for plate units,
    so a plate has one name in every stage's markers and parts)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


# ------------------------------------------------------------------------------------------------- inputs
def real_items(lake: Lake) -> pd.DataFrame:
    """One row per real site (catalog ``sites``) with its unit (plate) and channel URIs."""
    sites = lake.read_named("sites").to_pandas()
    if sites.empty:
        raise UserError("the catalog table 'sites' is empty; run `cpldm catalog` on a lake with images first")
    items = pd.DataFrame({k: sites[k] for k in SITE_META if k in sites.columns})
    items["Metadata_Draw"] = NO_DRAW
    items["Metadata_ImageRow"] = -1
    for ch in CHANNELS:
        items[f"URL_Orig{ch}"] = sites[f"URL_Orig{ch}"]
        items[f"URL_Illum{ch}"] = sites.get(f"URL_Illum{ch}", pd.Series([None] * len(sites))).fillna("")
    items["unit"] = [unit_name(s, b, p) for s, b, p in
                     zip(sites["Metadata_Source"], sites["Metadata_Batch"], sites["Metadata_Plate"])]
    return items


def synthetic_items(lake: Lake, run: str) -> pd.DataFrame:
    """One row per generated image of run ``run`` (``synthetic_manifest``) with its unit (generation block)."""
    from cpldm_core.design import draw_plate

    path = f"{storage_schemas.table_spec('synthetic_manifest').path}/run={run}"
    if not lake.exists(path):
        raise UserError(f"dataset {run!r}: no synthetic_manifest at {lake.uri_of(path)}; "
                        "use --dataset real or the name of a `cpldm generate` run")
    manifest = lake.read_table(path).to_pandas()
    pert = {}
    if lake.exists(storage_schemas.table_spec("compounds").path):
        compounds = lake.read_named("compounds", columns=["Metadata_JCP2022", "Metadata_pert_type"]).to_pandas()
        pert = dict(zip(compounds["Metadata_JCP2022"], compounds["Metadata_pert_type"]))
    jcp = manifest["Metadata_JCP2022"]
    # each draw is a synthetic plate, normalised downstream against its own DMSO images; the dmso_per_draw
    # DMSO images of a draw share its confounders, so their well rows are kept apart by Metadata_Draw =
    # draw + N * replicate (draw = Metadata_Draw mod N; treatments have replicate 0, Metadata_Draw = draw)
    draw = manifest["Metadata_Draw"].astype(np.int64)
    replicate = (manifest["Metadata_Replicate"].astype(np.int64) if "Metadata_Replicate" in manifest
                 else pd.Series(0, index=manifest.index, dtype=np.int64))
    n_draws = int(lake.read_json(f"synthetic/{run}/config.json")["generation"]["draws"]) if replicate.any() else 0
    items = pd.DataFrame({
        "Metadata_SiteKey": [f"{run}/{int(r)}" for r in manifest["Metadata_ImageRow"]],
        "Metadata_Source": manifest["Metadata_Source"], "Metadata_Batch": manifest["Metadata_Batch"],
        "Metadata_Plate": [draw_plate(d) for d in draw], "Metadata_Well": manifest["Metadata_Well"],
        "Metadata_Site": replicate + 1,
        "Metadata_JCP2022": jcp,
        "Metadata_pert_type": [pert.get(j) or ("negcon" if j == DMSO_JCP2022 else "trt") for j in jcp],
        "Metadata_Draw": draw + n_draws * replicate,
        "Metadata_ImageRow": manifest["Metadata_ImageRow"].astype(np.int64),
    })
    items["unit"] = [f"block-{int(b):06d}" for b in manifest["Metadata_Block"]]
    return items


# ------------------------------------------------------------------------------------------------- Ray map
class SiteProfiler:
    """Ray Data callable: a pandas batch of site rows -> rows of image profiles, single cells and rejects.

    Usable without Ray: ``SiteProfiler(lake, cfg, dataset)(batch_frame)``.
    """

    def __init__(self, lake: Lake, cfg: ProfileConfig, dataset: str):
        self.lake, self.cfg, self.dataset = lake, cfg, dataset
        self.names = list(feature_names(cfg.features))
        self.images = None
        # the one reader of real sites (ingest's too): uint16 checks, size limit, illumination functions
        self.reader = SiteReader(lake.endpoint_url, max_plane_bytes=cfg.max_plane_bytes)
        if dataset != "real":
            import zarr
            store = lake.zarr_store(f"synthetic/{dataset}/images.zarr", read_only=True)
            self.images = zarr.open_group(store, mode="r")["images"]

    def _load(self, row: dict) -> tuple[np.ndarray, np.ndarray | None]:
        if self.images is None:
            mode = self.cfg.segmentation.illumination
            got = self.reader.read_raw([row], with_illumination=mode in ("auto", "files"))[0]
            if isinstance(got, Exception):
                raise got
            raw, illum = got
            if mode == "files" and illum is None:
                raise UserError("segmentation.illumination=files but the site has no URL_Illum* columns")
            return raw, illum
        index = int(row["Metadata_ImageRow"])
        if not 0 <= index < self.images.shape[0]:
            raise UserError(f"Metadata_ImageRow {index} is outside images.zarr (rows 0..{self.images.shape[0] - 1})")
        return np.asarray(self.images[index]), None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for row in batch.to_dict("records"):
            meta = {k: row[k] for k in SITE_META}
            try:
                raw, illum = self._load(row)
                prof = profile_site(raw, self.cfg, illumination=illum)
            except Exception as exc:  # one bad image must not stop the unit: it becomes a reject
                item = row.get("URL_OrigDNA") if self.images is None else f"images.zarr row {row['Metadata_ImageRow']}"
                frames.append(pd.DataFrame([{**meta, "unit": row["unit"], "Metadata_Level": LEVEL_REJECT,
                                             "Metadata_ObjectNumber": -1, "Metadata_CellCount": 0,
                                             "Metadata_QCFlags": "", "Metadata_Item": str(item),
                                             "Metadata_Reason": f"{type(exc).__name__}: {exc}"}]))
                continue
            image = pd.DataFrame(prof.image[None, :], columns=self.names)
            head = {**meta, "unit": row["unit"], "Metadata_Level": LEVEL_IMAGE, "Metadata_ObjectNumber": -1,
                    "Metadata_CellCount": prof.count, "Metadata_QCFlags": ";".join(prof.flags),
                    "Metadata_Item": "", "Metadata_Reason": ""}
            if self.cfg.single_cell and prof.count:
                cells = pd.DataFrame(prof.cells, columns=self.names)
                cells_head = pd.DataFrame([{**head, "Metadata_Level": LEVEL_CELL}] * prof.count)
                cells_head["Metadata_ObjectNumber"] = prof.object_numbers
                frames.append(pd.concat([cells_head, cells], axis=1))
            # the image row last: should Ray split this output into blocks, a site's image row still arrives
            # after its cells, and completed_units counts a site as arrived on its image (or reject) row
            frames.append(pd.concat([pd.DataFrame([head]), image], axis=1))
        out = pd.concat(frames, ignore_index=True)
        for name in self.names:  # reject rows carry no features: NaN, same columns and dtypes in every batch
            if name not in out:
                out[name] = np.nan
        out[self.names] = out[self.names].astype(np.float32)
        for k in _STRING_META + ("unit", "Metadata_Level", "Metadata_QCFlags", "Metadata_Item", "Metadata_Reason"):
            out[k] = out[k].fillna("").astype(str)
        for k in ("Metadata_Site", "Metadata_Draw", "Metadata_ObjectNumber", "Metadata_CellCount"):
            out[k] = out[k].astype(np.int64)
        return out[[*SITE_META, "unit", "Metadata_Level", "Metadata_ObjectNumber", "Metadata_CellCount",
                    "Metadata_QCFlags", "Metadata_Item", "Metadata_Reason", *self.names]]


# ------------------------------------------------------------------------------------------------- writing
def _to_arrow(frame: pd.DataFrame, table_name: str, names: list[str]) -> pa.Table:
    """Frame -> Arrow table with the schema's metadata columns (typed, nulls restored) then features."""
    spec = storage_schemas.table_spec(table_name)
    frame = frame.copy()
    if "Metadata_Draw" in frame:
        frame["Metadata_Draw"] = frame["Metadata_Draw"].astype("Int64").where(frame["Metadata_Draw"] != NO_DRAW)
    if "Metadata_pert_type" in frame:
        frame["Metadata_pert_type"] = frame["Metadata_pert_type"].replace("", None)
    arrays, fields = [], []
    for f in spec.schema:
        if f.name in spec.partitioning:
            continue
        arrays.append(pa.Array.from_pandas(frame[f.name].reset_index(drop=True), type=f.type))
        fields.append(f)
    for name in names:
        # an image without cells has no feature values: pandas may hold them as pd.NA, Parquet gets NaN
        arrays.append(pa.array(frame[name].to_numpy(dtype=np.float32, na_value=np.nan), type=pa.float32()))
        fields.append(pa.field(name, pa.float32()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_unit(lake: Lake, cfg: ProfileConfig, dataset: str, unit: str, rows: pd.DataFrame,
               names: list[str]) -> dict:
    """Write one unit's tables at deterministic keys (part = unit) and commit it. Returns its counts."""
    part = {"dataset": dataset}
    images = rows[rows["Metadata_Level"] == LEVEL_IMAGE].sort_values("Metadata_SiteKey")
    rejects = rows[rows["Metadata_Level"] == LEVEL_REJECT].sort_values("Metadata_SiteKey")  # any arrival order
    lake.write_named("features_image", _to_arrow(images, "features_image", names), config=cfg, part=unit,
                     partition=part)
    wells = aggregate.well_from_images(images[[*aggregate.WELL_KEYS, *names]]) if len(images) else \
        pd.DataFrame(columns=[*aggregate.WELL_KEYS, "Metadata_SiteCount", *names])
    lake.write_named("features_well", _to_arrow(wells, "features_well", names), config=cfg, part=unit,
                     partition=part)
    n_cells = 0
    if cfg.single_cell:
        cells = rows[rows["Metadata_Level"] == LEVEL_CELL].sort_values(["Metadata_SiteKey", "Metadata_ObjectNumber"])
        n_cells = len(cells)
        lake.write_named("features_single_cell", _to_arrow(cells, "features_single_cell", names), config=cfg,
                         part=unit, partition=part)
    reject_part = _safe(f"{dataset}__{unit}")
    if len(rejects):
        table = pa.table({"unit": [unit] * len(rejects), "item": rejects["Metadata_Item"].tolist(),
                          "reason": rejects["Metadata_Reason"].tolist()})
        lake.write_named("rejects", table, config=cfg, part=reject_part, partition={"stage": STAGE})
    else:
        lake.delete(f"{storage_schemas.table_spec('rejects').path}/stage={STAGE}/{reject_part}.parquet")
    counts = {"sites": int(len(images) + len(rejects)), "images": int(len(images)), "rejected": int(len(rejects)),
              "wells": int(len(wells)), "cells": int(images["Metadata_CellCount"].sum()),
              "flagged": int((images["Metadata_QCFlags"] != "").sum()), "single_cells": n_cells}
    lake.commit_unit(marker_stage(dataset), unit, counts)
    return counts


def write_treatments(lake: Lake, dataset: str, config=None) -> int:
    """Recompute ``features_treatment`` of ``dataset`` from all its wells (mean over replicate wells/draws)."""
    well_dir = f"{storage_schemas.table_spec('features_well').path}/dataset={dataset}"
    wells = lake.read_table(well_dir).to_pandas()
    names = aggregate.feature_columns(wells)
    treatments = aggregate.treatment_from_wells(wells) if len(wells) else \
        pd.DataFrame(columns=[*aggregate.TREATMENT_KEYS, "Metadata_WellCount", *names])
    lake.write_named("features_treatment", _to_arrow(treatments, "features_treatment", names), config=config,
                     part=TREATMENT_PART, partition={"dataset": dataset})
    return len(treatments)


# ------------------------------------------------------------------------------------------------- run
def run(lake: Lake, config: ProfileConfig | None = None, dataset: str | None = None,
        max_units: int | None = None) -> dict:
    """Profile every uncommitted unit of ``dataset`` (default ``config.dataset``); returns summary counts.

    ``max_units`` stops after that many units (used to test resumption; a rerun finishes the rest). Units are
    claimed (:meth:`Lake.claim_unit`) before they are measured, so concurrent runs split the work; a resumed run
    whose science config differs from the committed units' is refused (:func:`check_resume`).
    """
    cfg = config or PRESETS["demo"]
    dataset = dataset or cfg.dataset
    cfg = replace(cfg, dataset=dataset)
    check_name(dataset, "dataset")
    t0 = time.time()
    items = real_items(lake) if dataset == "real" else synthetic_items(lake, dataset)
    stage = marker_stage(dataset)
    done = lake.committed_units(stage)
    planned = profile_set_record(lake, cfg, dataset, items)
    check_resume(lake, cfg, dataset, done, planned)
    units = sorted(set(items["unit"]))
    # claim units one by one: a second run started on the same dataset takes the units this one has not
    todo, busy = [], []
    for unit in units:
        if unit in done or (max_units is not None and len(todo) >= max_units):
            continue
        (todo if lake.claim_unit(stage, unit) else busy).append(unit)
    log.info("profile %s: %d units (%d sites), %d already committed, %d claimed by another run, %d to do", dataset,
             len(units), len(items), len(set(units) & done), len(busy), len(todo))
    lake.write_config(f"features/_config/{dataset}", cfg)
    names = list(feature_names(cfg.features))
    totals = {"sites": 0, "images": 0, "rejected": 0, "wells": 0, "cells": 0, "flagged": 0, "single_cells": 0}
    try:
        _profile_units(lake, cfg, dataset, items, todo, names, totals)
    finally:
        for unit in todo:  # committed or not: a rerun (or another run) may take what this one left
            lake.release_unit(stage, unit)
    treatments = write_treatments(lake, dataset, config=cfg) if (todo or done) else 0
    wells = sum(int(lake.unit_info(stage, u).get("wells", 0)) for u in lake.committed_units(stage))
    write_record(lake, artifact_dir("ProfileSet", dataset), replace(planned, n_features=len(names), n_wells=wells))
    summary = {"dataset": dataset, "units": len(units), "units_done_now": len(todo),
               "units_skipped": len(set(units) & done), "units_busy": len(busy),
               **totals, "treatments": treatments, "features": len(names), "seconds": round(time.time() - t0, 2)}
    log.info("profile %s: %s", dataset, summary)
    return summary


#: ProfileConfig keys that only choose resources or limits: a resumed run may change them.
RESOURCE_KEYS = ("dataset", "workers", "num_cpus_per_worker", "batch_size", "units_per_wave", "max_plane_bytes")


def profile_set_record(lake: Lake, cfg: ProfileConfig, dataset: str, items: pd.DataFrame) -> ProfileSet:
    """The ProfileSet asked for: profiles of the catalog's sites (input ``catalog``: hash of the site keys) or of a
    generation run (input ``images``: its GenerationRun record, an error naming `cpldm generate` when missing)."""
    from pipelines.storage import code_version

    if dataset == "real":
        keys = "\n".join(sorted(items["Metadata_SiteKey"].astype(str)))
        inputs, kind = {"catalog": InputRef(kind="Catalog", id="sites", fingerprint=fingerprint_of(keys))}, "real"
    else:
        inputs, kind = {"images": read_artifact(lake, GenerationRun, dataset).ref()}, "generated"
    settings = json.loads(json.dumps(config_to_dict(cfg)))
    return ProfileSet(id=dataset, inputs=inputs, config={k: v for k, v in settings.items() if k not in RESOURCE_KEYS},
                      resources={k: settings[k] for k in RESOURCE_KEYS if k in settings}, code_version=code_version(),
                      dataset_kind=kind, levels=("image", "well", "treatment") + (("cell",) if cfg.single_cell else ()))


def read_profile_set(lake: Lake, dataset: str) -> ProfileSet:
    """The ProfileSet record of ``dataset`` (profiled or imported; one-line error naming `cpldm profile`)."""
    return read_artifact(lake, ProfileSet, dataset)


def record_imported(lake: Lake, dataset: str, config: dict, path: str, n_features: int) -> None:
    """The ProfileSet of a ``cpldm profile import`` dataset; its input is the imported file (named, hashed with
    the import options), a source of the lineage like the catalog."""
    settings = json.loads(json.dumps(config))
    well_dir = f"{storage_schemas.table_spec('features_well').path}/dataset={dataset}"
    n_wells = lake.read_table(well_dir, columns=["Metadata_Well"]).num_rows   # every imported file's wells
    write_record(lake, artifact_dir("ProfileSet", dataset), ProfileSet(
        id=dataset, inputs={"file": InputRef(kind="ProfileFile", id=str(path).rsplit("/", 1)[-1],
                                             fingerprint=fingerprint_of(settings))},
        config=settings, dataset_kind="imported", feature_set="imported", levels=("well", "treatment"),
        n_features=n_features, n_wells=n_wells))


def check_resume(lake: Lake, cfg: ProfileConfig, dataset: str, done: set[str],
                 planned: ProfileSet | None = None) -> None:
    """Refuse to add units made with another science config or other inputs to a dataset's committed ones.

    The rule of every stage: the ProfileSet's fingerprint (science config, catalog or generation run) must match
    the stored one; resources may differ. A dataset profiled before records existed is checked on its config.
    """
    if done and planned is not None and lake.exists(f"{artifact_dir('ProfileSet', dataset)}/_artifact.json"):
        stored = read_record(lake, artifact_dir("ProfileSet", dataset), ProfileSet, dataset)
        if stored.fingerprint != planned.fingerprint:
            raise UserError(f"profile --dataset {dataset}: {len(done)} unit(s) were profiled with another config "
                            f"or inputs (changed: {', '.join(planned.changed_fields(stored))}); rerun with --reset "
                            "to redo the dataset with this config, or use the config it was made with")
        return
    rel = f"features/_config/{dataset}/config.json"
    if not done or not lake.exists(rel):
        return
    old = {k: v for k, v in lake.read_json(rel).get("config", {}).items() if k not in RESOURCE_KEYS}
    new = {k: v for k, v in json.loads(json.dumps(config_to_dict(cfg))).items() if k not in RESOURCE_KEYS}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(f"profile --dataset {dataset}: {len(done)} unit(s) were profiled with another config "
                        f"(changed: {', '.join(changed)}); rerun with --reset to redo the dataset with this config, "
                        "or use the config it was made with")


def completed_units(batches: Iterable[pd.DataFrame], expected_sites: dict[str, int]
                    ) -> Iterator[tuple[str, pd.DataFrame]]:
    """Group streamed :class:`SiteProfiler` output by unit and yield ``(unit, rows)`` as soon as the last site of
    a unit has arrived, so the caller can write and commit it while later sites are still measured.

    ``batches``: frames of SiteProfiler rows in any order (each site gives one image or reject row, plus its cell
    rows); ``expected_sites``: unit -> number of sites. Only units with sites still to come are held, so memory
    follows the units in flight (with plate-sorted input, about one plate per worker), not the whole wave.
    Raises RuntimeError naming the units whose site count does not reconcile (a site lost or given twice).
    """
    pending: dict[str, list[pd.DataFrame]] = {}
    arrived: dict[str, int] = {}
    for batch in batches:
        for unit, rows in batch.groupby("unit", sort=False):
            if unit not in expected_sites:
                raise RuntimeError(f"profile: rows for unit {unit!r}, which is not in this wave")
            if unit in arrived and unit not in pending:
                raise RuntimeError(f"profile: rows for unit {unit!r} after all its sites had arrived")
            pending.setdefault(unit, []).append(rows)
            arrived[unit] = arrived.get(unit, 0) + int((rows["Metadata_Level"] != LEVEL_CELL).sum())
            if arrived[unit] > expected_sites[unit]:
                raise RuntimeError(f"profile: unit {unit!r} got {arrived[unit]} site rows for "
                                   f"{expected_sites[unit]} sites")
            if arrived[unit] == expected_sites[unit]:
                yield unit, pd.concat(pending.pop(unit), ignore_index=True)
    short = {u: f"{arrived.get(u, 0)}/{n}" for u, n in expected_sites.items() if arrived.get(u, 0) < n}
    if short:
        raise RuntimeError(f"profile: the wave ended with sites missing (unit: rows/sites): {short}")


def _profile_units(lake: Lake, cfg: ProfileConfig, dataset: str, items: pd.DataFrame, todo: list[str],
                   names: list[str], totals: dict) -> None:
    """Measure the ``todo`` units in waves of ``cfg.units_per_wave`` (one Ray Data execution each) and write and
    commit every unit as soon as its last site is measured (:func:`completed_units`); adds counts to ``totals``.

    The driver holds only the rows of units still in flight, never a whole wave: a wave of JUMP plates would be
    ~17 GiB of per-cell rows (docs/benchmarks.md), and a killed run loses only the units in flight.
    """
    from tqdm import tqdm

    from pipelines import progress
    from pipelines.ray_runtime import ensure_ray

    if todo:
        ray = ensure_ray()
        bar = tqdm(total=len(todo), desc=f"profile {dataset}", unit="unit", disable=progress.active())
        progress.report(0, len(todo))  # the demo's step line (a no-op outside the demo)
        for start in range(0, len(todo), cfg.units_per_wave):
            wave = todo[start:start + cfg.units_per_wave]
            # unit by unit (stable), so that units finish one after another and few are in flight at once
            batch = items[items["unit"].isin(wave)].sort_values("unit", kind="stable").reset_index(drop=True)
            # one block per batch of sites (split here: Ray's own splitting breaks on pandas 3 frames)
            blocks = [batch.iloc[i:i + cfg.batch_size] for i in range(0, len(batch), cfg.batch_size)]
            ds = ray.data.from_pandas(blocks).map_batches(
                SiteProfiler, fn_constructor_kwargs={"lake": lake, "cfg": cfg, "dataset": dataset},
                batch_format="pandas", batch_size=cfg.batch_size, concurrency=cfg.workers,
                num_cpus=cfg.num_cpus_per_worker,
            )
            expected = batch.groupby("unit").size().to_dict()
            # batch_size=None: Ray's output blocks as they are, streamed (no re-batching, nothing collected)
            streamed = ds.iter_batches(batch_size=None, batch_format="pandas")
            for unit, rows in completed_units(streamed, expected):
                counts = write_unit(lake, cfg, dataset, unit, rows, names)
                for k, v in counts.items():
                    totals[k] += v
                bar.update(1)
                progress.report(advance=1)
        bar.close()


# ------------------------------------------------------------------------------------------------- CLI
def load_profile_config(args) -> ProfileConfig:
    from pipelines.cli import config_from_args

    cfg = config_from_args(ProfileConfig, PRESETS, args)
    if args.feature_set:
        cfg = replace(cfg, features=replace(cfg.features, feature_set=args.feature_set))
    if args.single_cell:
        cfg = replace(cfg, single_cell=True)
    if args.workers:
        cfg = replace(cfg, workers=args.workers)
    return replace(cfg, dataset=args.dataset)


def _cmd_profile(args) -> int:
    from pipelines.cli import lake_from_args

    lake = lake_from_args(args)
    cfg = load_profile_config(args)
    if args.reset:
        lake.reset_stage(marker_stage(cfg.dataset))
    summary = run(lake, cfg)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def add_parser(sub) -> None:
    from cpldm_core.configuration import lake_name
    from pipelines.cli import add_config_arguments

    parser = sub.add_parser("profile", help="segment images and extract CellProfiler-style features into Parquet",
                            description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="real", type=lake_name,
                        help="'real' (catalog sites) or a synthetic generation run")
    add_config_arguments(parser, PRESETS, ProfileConfig)
    parser.add_argument("--feature-set", choices=("default", "cellprofiler", "full"), default=None)
    parser.add_argument("--single-cell", action="store_true", help="also write features_single_cell")
    parser.add_argument("--workers", type=int, default=None, help="parallel Ray Data workers")
    parser.add_argument("--reset", action="store_true", help="forget committed units and redo the dataset")
    parser.set_defaults(func=_cmd_profile, profile_command=None)
    inner = parser.add_subparsers(dest="profile_command", metavar="[import]")
    from pipelines.profile_import import add_import_parser  # after this module: it builds on _to_arrow & co.
    add_import_parser(inner)
