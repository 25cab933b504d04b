"""``cpldm ingest``: catalogued TIFFs -> normalised crops -> channel-group VAE latents in Zarr (Ray Data).

Recipe (one Ray Data pipeline over the sites of the plates not yet committed):

1. ``SiteReader`` (CPU actors): read the 5 channel TIFFs (local or S3; tifffile + imagecodecs), optional JUMP
   illumination correction, global per-channel robust-percentile normalisation to [-1, 1], centre crop or
   tiles. Unreadable sites become rows with ``ok=False`` and a reason.
2. ``Encoder`` (actors holding the VAE; ``num_gpus`` from the config): ``ChannelGroupAutoencoder.encode``.
3. ``groupby(unit).map_groups(write_unit)``: one task per plate writes the plate's whole block of shards of
   ``latents/<vae_id>/latents.zarr``, its ``latent_index`` and ``rejects`` parts, then commits the plate.

Row assignment: plates are laid out in catalog order (source, batch, plate); each plate owns a block of
``ceil(sites * crops_per_site / rows_per_shard)`` whole shards starting at a shard boundary. Inside the
block, the crops of successfully read sites are stored contiguously in catalog order (site, then crop);
rows left over (rejected sites, shard padding) hold NaN and appear in no index row. The block layout is a
function of the catalog and the config only, so a killed run, rerun, writes the same bytes to the same
rows: exactly-once per plate. Plates are claimed (:meth:`Lake.claim_units`) before they are encoded, so two runs
started on one cache split the plates instead of both encoding all of them (docs/lake.md).

Normalisation statistics are computed once (before any plate is written) over a deterministic sample of
training sites and stored in ``latents/<vae_id>/normalisation.json`` and the array attributes; a resumed run
reuses them. ``latents/<vae_id>/_artifact.json`` is the cache's ``LatentCache`` record (docs/architecture.md):
a run whose science fingerprint (config without resources, VAE record, catalog) differs from it is refused.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core import images as im
from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.load_data import hash_rank, training_sites
from storage_schemas import columns as c
from storage_schemas.artifacts import InputRef, LatentCache, VaeModel, fingerprint_of, read_record, write_record
from storage_schemas.zarr_layouts import LATENTS

from pipelines import site_reader

log = logging.getLogger(__name__)

STAGE_PREFIX = "ingest"
#: Claim name (no plate is named so: plate names hold ``__``) held while a run creates the cache.
CACHE_UNIT = "_cache"
#: Config keys that only choose resources: they may change between a run and its resumption.
RESOURCE_KEYS = ("read_concurrency", "num_cpus_read", "encode_concurrency", "num_gpus", "num_cpus_encode", "batch_size",
                 "max_plane_bytes", "fuse_read_encode")
VAE_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: A model-hub id (``owner/name``): the only form of ``--vae`` that may reach the network.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def stage_name(vae_id: str) -> str:
    return f"{STAGE_PREFIX}-{vae_id}"


def unit_name(source: str, batch: str, plate: str) -> str:
    """Marker/part name of a plate (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{source}__{batch}__{plate}")


# ---------------------------------------------------------------------------------------------- VAE location
def sanitise_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip("/")).strip("-") or "vae"


def lake_vaes(lake) -> list[str]:
    """Names of the VAEs in the lake (``vae/<name>/config.json``), sorted."""
    return sorted(p.rsplit("/", 1)[-1] for p in lake.ls("vae") if lake.exists(f"{p}/config.json"))


def resolve_vae(lake, vae: str, subfolder: str | None, vae_id: str = "") -> dict:
    """Where the VAE comes from: ``{"vae_id", "kind": "lake"|"local"|"hub", "path", "subfolder"}``. No network.

    ``vae`` is, in this order: empty -> the lake's only VAE (an error listing them when there are several or
    none); a name of a VAE in the lake (``vae/<vae>/``; ``lake:<name>`` forces it); a local diffusers
    directory; a model-hub id ``owner/name`` (the only form that is downloaded, and only when loaded). A bare
    name that is not in the lake is an error listing the lake's VAEs -- never a hub request. ``vae_id`` (the
    cache name) defaults to the lake name, or to the path/id made file-name safe
    (``stabilityai/sdxl-vae`` -> ``stabilityai--sdxl-vae``).
    """
    vae = (vae or "").strip()
    if not vae:
        found = lake_vaes(lake)
        if len(found) != 1:
            raise UserError(f"ingest: no VAE given and {lake.uri_of('vae')} holds "
                            f"{', '.join(found) if found else 'none'}: pass --vae <lake name>, a diffusers directory "
                            "or a hub id (stabilityai/sdxl-vae)" + ("" if found else ", or run `cpldm fit-vae` first"))
        vae = found[0]
    name = vae[len("lake:"):] if vae.startswith("lake:") else vae
    if vae.startswith("lake:") or ("/" not in vae.strip("/") and not os.path.isdir(vae)):
        if not lake.exists(f"vae/{name}/config.json"):
            found = lake_vaes(lake)
            raise UserError(f"ingest: no VAE '{name}' in {lake.uri_of('vae')} (it holds "
                            f"{', '.join(found) if found else 'none'}); run `cpldm fit-vae --vae-id {name}`, pass "
                            "--vae with one of those, or a hub id (owner/name)")
        return {"vae_id": vae_id or name, "kind": "lake", "path": f"vae/{name}", "subfolder": None}
    if os.path.isdir(vae):
        path = os.path.abspath(vae)
        default_id = sanitise_id(os.path.basename(path.rstrip("/")) + (f"--{subfolder}" if subfolder else ""))
        return {"vae_id": vae_id or default_id, "kind": "local", "path": path, "subfolder": subfolder}
    if HUB_ID.fullmatch(vae):
        return {"vae_id": vae_id or sanitise_id(vae + (f"--{subfolder}" if subfolder else "")), "kind": "hub",
                "path": vae, "subfolder": subfolder}
    raise UserError(f"ingest: --vae {vae!r} is not a VAE in the lake, not a directory and not a hub id (owner/name)")


def vae_ref(lake, source: dict) -> InputRef:
    """The VAE as an input of the latent cache: a lake VAE's own VaeModel record (an error naming
    `cpldm fit-vae` when it has none); a directory or hub VAE by its location."""
    if source["kind"] == "lake":
        name = source["path"].split("/", 1)[1]
        return read_record(lake, source["path"], VaeModel, name).ref()
    return InputRef(kind="VaeModel", id=source["vae_id"],
                    fingerprint=fingerprint_of({k: source[k] for k in ("kind", "path", "subfolder")}))


def load_autoencoder(lake, source: dict, groups):
    """``ChannelGroupAutoencoder`` from a :func:`resolve_vae` result (lake VAEs on S3 are copied to a tmp dir).

    Only a ``hub`` source may download; lake and directory VAEs load with ``local_files_only``.
    """
    from cpldm_core.autoencoder import ChannelGroupAutoencoder

    if source["kind"] != "lake":
        return ChannelGroupAutoencoder.from_pretrained(source["path"], subfolder=source["subfolder"], groups=groups,
                                                       local_files_only=source["kind"] == "local")
    with lake.local_dir(source["path"]) as path:
        return ChannelGroupAutoencoder.from_pretrained(path, groups=groups, local_files_only=True)


# ---------------------------------------------------------------------------------------------- reading
class SiteReader(site_reader.SiteReader):
    """The shared site reader (:mod:`pipelines.site_reader`) plus ingest's normalisation and crops.

    Callable on a Ray Data numpy batch with ``URL_Orig<ch>``/``URL_Illum<ch>`` columns; also usable directly.
    """

    def __init__(self, endpoint_url: str | None = None, illumination: str = "auto",
                 normalisation: dict | None = None, crop_mode: str = "centre", crop_size: int = 0,
                 tile_grid: int = 2, max_plane_bytes: int = im.DEFAULT_MAX_PLANE_BYTES):
        super().__init__(endpoint_url, max_plane_bytes=max_plane_bytes)
        self.illumination = illumination
        self.norm = im.Normalisation.from_dict(normalisation) if normalisation else None
        self.crop_mode, self.crop_size, self.tile_grid = crop_mode, crop_size, tile_grid

    def read_sites(self, rows: list[dict]) -> list[np.ndarray | im.ImageError]:
        """Each row -> ``(5, H, W) float32`` grey levels (illumination-corrected) or the ImageError why not."""
        return super().read_sites(rows, self.illumination)

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch of sites -> one row per crop: order, unit, site key, crop, ok, reason, image."""
        n = len(batch["Metadata_SiteKey"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        per_site = im.crops_per_site(self.crop_mode, self.tile_grid)
        shape = (5, self.crop_size, self.crop_size)
        out = {"order": [], "unit": [], "Metadata_SiteKey": [], "crop": [], "ok": [], "reason": [], "image": []}
        for r, img in zip(rows, self.read_sites(rows)):
            crops, reason = None, ""
            if isinstance(img, Exception):
                reason = str(img)
            else:
                try:
                    crops = im.crops_of(im.normalise(img, self.norm.low, self.norm.high), self.crop_mode,
                                        self.crop_size, self.tile_grid)
                except im.ImageError as exc:
                    reason = f"{r['Metadata_SiteKey']}: {exc}"
            for j in range(per_site if crops is not None else 1):
                out["order"].append(int(r["order"]))
                out["unit"].append(str(r["unit"]))
                out["Metadata_SiteKey"].append(str(r["Metadata_SiteKey"]))
                out["crop"].append(j)
                out["ok"].append(crops is not None)
                out["reason"].append(reason)
                out["image"].append(crops[j] if crops is not None else np.zeros(shape, np.float32))
        return {k: (np.stack(v) if k == "image" else np.asarray(v)) for k, v in out.items()}


def site_records(sites: pd.DataFrame) -> list[dict]:
    """Catalog rows as plain dicts with string URLs ('' for no illumination)."""
    cols = ["Metadata_SiteKey", *[f"URL_Orig{ch}" for ch in c.CHANNELS], *[f"URL_Illum{ch}" for ch in c.CHANNELS]]
    df = sites[[x for x in cols if x in sites.columns]].copy()
    for ch in c.CHANNELS:
        if f"URL_Illum{ch}" not in df.columns:
            df[f"URL_Illum{ch}"] = ""
    return df.fillna("").to_dict("records")


def stats_sample(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The ``n`` training sites with the lowest hash rank (deterministic; independent of catalog order)."""
    ranks = train["Metadata_SiteKey"].map(lambda k: hash_rank(seed, k))
    return train.assign(_r=ranks).sort_values("_r").head(n).drop(columns="_r").reset_index(drop=True)


def compute_normalisation(lake, sample: pd.DataFrame, illumination: str, low_pct: float, high_pct: float,
                          concurrency: int = 2, max_plane_bytes: int = im.DEFAULT_MAX_PLANE_BYTES
                          ) -> im.Normalisation:
    """Global per-channel robust percentiles over ``sample`` sites (read in Ray tasks; unreadable skipped)."""
    import ray

    reader_args = dict(endpoint_url=lake.endpoint_url, illumination=illumination, max_plane_bytes=max_plane_bytes)

    @ray.remote(num_cpus=1)
    def pixels(rows):
        reader = SiteReader(**reader_args)
        return [im.subsample_pixels(x) for x in reader.read_sites(rows) if not isinstance(x, Exception)]

    recs = site_records(sample)
    chunks = [recs[i::max(1, concurrency)] for i in range(max(1, concurrency))]
    pooled = [p for part in ray.get([pixels.remote(ch) for ch in chunks if ch]) for p in part]
    if not pooled:
        raise UserError("normalisation: none of the sampled training sites could be read; see `cpldm ingest` "
                        "rejects or check the TIFF URLs in catalog/sites.parquet")
    return im.robust_percentiles(pooled, low_pct, high_pct)


# ---------------------------------------------------------------------------------------------- encoding
class Encoder:
    """Holds the channel-group VAE (loaded once) and encodes a Ray Data batch of crops to float16 latents."""

    def __init__(self, lake, source: dict, groups, num_threads: int = 0):
        import torch
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        self.model = load_autoencoder(lake, source, groups)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        x = batch.pop("image")
        ok = batch["ok"].astype(bool)
        h = x.shape[-1] // 8
        lat = np.full((len(x), 8, h, h), np.nan, np.float16)
        if ok.any():
            lat[ok] = self.model.encode_cached(self.torch.from_numpy(np.ascontiguousarray(x[ok])))
        batch["latent"] = lat
        return batch


class ReadEncoder:
    """A :class:`SiteReader` and an :class:`Encoder` in one actor (``fuse_read_encode``): sites in, latents out,
    with no hand-over of crops between actor pools. Same rows as ``Encoder(SiteReader(batch))``."""

    def __init__(self, reader: dict, encoder: dict):
        self.reader = SiteReader(**reader)
        self.encoder = Encoder(**encoder)

    def __call__(self, batch: dict) -> dict:
        return self.encoder(self.reader(batch))


# ---------------------------------------------------------------------------------------------- plan and write
def plan_units(sites: pd.DataFrame, per_site: int, rows_per_shard: int) -> pd.DataFrame:
    """Plates in catalog order with their shard-aligned row blocks: unit, source, batch, plate, sites, offset, rows."""
    keys = ["Metadata_Source", "Metadata_Batch", "Metadata_Plate"]
    g = sites.groupby(keys, sort=False).size().reset_index(name="sites")
    g["rows"] = [int(math.ceil(n * per_site / rows_per_shard)) * rows_per_shard for n in g["sites"]]
    g["offset"] = np.concatenate([[0], np.cumsum(g["rows"].to_numpy())[:-1]]).astype(np.int64)
    g["unit"] = [unit_name(*k) for k in g[keys].itertuples(index=False)]
    return g


def open_latents(lake, vae_id: str, mode: str = "r+"):
    import zarr
    return zarr.open_array(store=lake.zarr_store(LATENTS.path.format(vae_id=vae_id)), path=LATENTS.array, mode=mode)


def create_latents(lake, vae_id: str, total_rows: int, latent_hw: int, rows_per_shard: int, attrs: dict):
    """Create (overwrite) the latent array: (N, 8, h, w) float16, 1 row per chunk, ``rows_per_shard`` per shard."""
    import zarr
    store = lake.zarr_store(LATENTS.path.format(vae_id=vae_id))
    group = zarr.open_group(store=store, mode="w")
    arr = group.create_array(LATENTS.array, shape=(total_rows, 8, latent_hw, latent_hw), dtype=LATENTS.dtype,
                             chunks=(LATENTS.rows_per_chunk, 8, latent_hw, latent_hw),
                             shards=(rows_per_shard, 8, latent_hw, latent_hw), fill_value=np.nan, overwrite=True)
    arr.attrs.update(attrs)
    group.attrs.update({"vae_id": vae_id})
    return arr


def write_unit(batch: dict, lake, vae_id: str, plan: dict, sites_meta: dict, config: dict) -> dict:
    """One plate's Ray task: write its whole block of rows, index and rejects, then commit the plate."""
    unit = str(batch["unit"][0])
    offset, rows = plan[unit]
    order = np.lexsort((batch["crop"], batch["order"]))
    ok = batch["ok"][order].astype(bool)
    lat = batch["latent"][order]
    keys, crops, reasons = batch["Metadata_SiteKey"][order], batch["crop"][order], batch["reason"][order]
    block = np.full((rows, *lat.shape[1:]), np.nan, np.float16)
    n_ok = int(ok.sum())
    block[:n_ok] = lat[ok]
    open_latents(lake, vae_id)[offset:offset + rows] = block

    meta_cols = [c.SOURCE.name, c.BATCH.name, c.PLATE.name, c.WELL.name, c.SITE.name, c.JCP2022.name,
                 c.PERT_TYPE.name]
    idx = pd.DataFrame({"Metadata_LatentRow": offset + np.arange(n_ok, dtype=np.int64),
                        "Metadata_SiteKey": keys[ok].astype(str), "Metadata_Crop": crops[ok].astype(np.int32)})
    for col in meta_cols:
        idx[col] = [sites_meta[k][col] for k in idx["Metadata_SiteKey"]]
    idx[c.SITE.name] = idx[c.SITE.name].astype(np.int32)
    import storage_schemas
    schema = storage_schemas.table_spec("latent_index").schema
    idx_tbl = pa.Table.from_pandas(idx[[n for n in schema.names if n != "vae"]],
                                   schema=pa.schema([f for f in schema if f.name != "vae"]), preserve_index=False)
    lake.write_named("latent_index", idx_tbl, config=config, part=unit, partition={"vae": vae_id})
    bad = pd.DataFrame({"item": keys[~ok].astype(str), "reason": reasons[~ok].astype(str)}).drop_duplicates("item")
    rej = pa.table({"unit": [unit] * len(bad), "item": bad["item"].tolist(), "reason": bad["reason"].tolist()},
                   schema=pa.schema([("unit", pa.string()), ("item", pa.string()), ("reason", pa.string())]))
    lake.write_named("rejects", rej, config=config, part=f"{vae_id}__{unit}", partition={"stage": stage_name(vae_id)})
    n_sites = len(set(keys.tolist()))
    info = {"sites": n_sites, "encoded_sites": n_sites - len(bad), "rejected": len(bad), "crops": n_ok,
            "offset": int(offset), "rows": int(rows)}
    lake.commit_unit(stage_name(vae_id), unit, info)
    return {"unit": np.array([unit]), **{k: np.array([v]) for k, v in info.items()}}


# ---------------------------------------------------------------------------------------------- run
def select_sites(lake, subset: str) -> pd.DataFrame:
    sites = lake.read_named("sites").to_pandas()
    if subset == "all":
        return sites
    return training_sites(sites, lake.read_named("split_compounds").to_pandas(),
                          lake.read_named("split_batches").to_pandas())


def latent_cache_record(config: im.IngestConfig, source: dict, vae: InputRef, groups, per_site: int,
                        plan: pd.DataFrame, sites: pd.DataFrame) -> LatentCache:
    """The LatentCache record asked for by ``config`` (outputs -- normalisation, scaling -- still unset).

    Its fingerprint covers the science config (resources apart), the VAE's fingerprint and the catalog's:
    the planned plates' row blocks and every planned site key, in order.
    """
    import hashlib

    from cpldm_core.autoencoder import DOWNSAMPLE, LATENT_CHANNELS_PER_GROUP
    from pipelines.storage import code_version

    cfg = config_to_dict(config)
    keys = hashlib.sha256("\n".join(sites["Metadata_SiteKey"].astype(str)).encode()).hexdigest()
    catalog = fingerprint_of({"plan": plan[["unit", "offset", "rows", "sites"]].to_dict("list"), "site_keys": keys})
    side = config.crop_size // DOWNSAMPLE
    location = f"lake:{source['path']}" if source["kind"] == "lake" else f"{source['kind']}:{source['path']}"
    return LatentCache(
        id=source["vae_id"], inputs={"vae": vae, "catalog": InputRef(kind="Catalog", id="sites", fingerprint=catalog)},
        vae_id=vae.id, vae_location=location, vae_subfolder=source["subfolder"], channels=tuple(c.CHANNELS),
        channel_groups=tuple(tuple(g) for g in groups), illumination=config.illumination,
        normalisation_method=im.NORMALISATION_METHOD, low_percentile=config.low_percentile,
        high_percentile=config.high_percentile, crop_mode=config.crop_mode, crop_size=config.crop_size,
        tile_grid=config.tile_grid, crops_per_site=per_site,
        latent_shape=(LATENT_CHANNELS_PER_GROUP * len(groups), side, side),
        config={k: v for k, v in cfg.items() if k not in RESOURCE_KEYS and k != "vae_id"},
        resources={k: cfg[k] for k in RESOURCE_KEYS if k in cfg}, code_version=code_version())


def read_latent_cache(lake, vae_id: str) -> LatentCache:
    """The record of ``latents/<vae_id>/`` (one-line error naming `cpldm ingest` when it is missing or older)."""
    return read_record(lake, f"latents/{vae_id}", LatentCache, vae_id)


def recorded_vae_source(lake, vae_id: str) -> tuple[dict, dict]:
    """``(vae_source, ingest config)`` recorded in ``latents/<vae_id>/config.json``: the VAE that made the cache
    (:func:`resolve_vae` form, for :func:`load_autoencoder`) and the crop/illumination settings it was made with."""
    recorded = lake.read_json(f"latents/{vae_id}/config.json")
    source = recorded.get("vae_source")
    if not source:
        raise UserError(f"{lake.uri_of(f'latents/{vae_id}/config.json')} does not record its vae_source; "
                        "rerun `cpldm ingest --force`")
    return source, recorded.get("config") or {}


def run(lake, config: im.IngestConfig, units: list[str] | None = None, max_units: int | None = None,
        force: bool = False) -> dict:
    """Encode the catalogued sites into ``latents/<vae_id>/``; committed plates are skipped.

    Concurrent runs on one cache split it: the cache is created under a claim (a second run waits, then reuses
    it), and each plate is claimed before it is encoded (a plate another live run holds is left to it).

    Args:
        units: only these plate units (names as in ``plan``: ``<source>__<batch>__<plate>``).
        max_units: stop after this many new plates (to split work, and to test resumption).
        force: forget committed plates and rebuild the cache from scratch.
    Returns:
        {"vae_id", "sites", "encoded_sites", "rejected", "crops", "units", "units_written", "units_skipped",
         "units_busy" (held by another live run), "rows", "seconds"} -- counts over all committed units, so
        sites = encoded_sites + rejected.
    """
    from cpldm_core.autoencoder import check_groups
    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    ray = ensure_ray()
    groups = check_groups(config.channel_groups)
    source = resolve_vae(lake, config.vae, config.vae_subfolder, config.vae_id)
    vae_id = source["vae_id"]
    # the recorded config names the VAE actually used, also when it was found as the lake's only one
    config = replace(config, vae_id=vae_id, vae=source["path"].split("/", 1)[1] if source["kind"] == "lake"
                     else source["path"])
    stage, base = stage_name(vae_id), f"latents/{vae_id}"
    sites = select_sites(lake, config.subset)
    if sites.empty:
        raise UserError(f"ingest: no sites in subset {config.subset!r}; check catalog/split tables")
    per_site = im.crops_per_site(config.crop_mode, config.tile_grid)
    plan = plan_units(sites, per_site, config.rows_per_shard)
    sites = sites.merge(plan[["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "unit"]], how="left")
    sites["order"] = np.arange(len(sites))
    planned = latent_cache_record(config, source, vae_ref(lake, source), groups, per_site, plan, sites)
    if force:
        lake.reset_stage(stage)
    # the cache is created under a claim: a run started meanwhile waits for it, then adds plates to it
    # instead of creating it again over the plates this one is writing
    lake.wait_and_claim(stage, CACHE_UNIT)
    try:
        done = lake.committed_units(stage)
        norm = None if force else reusable_cache(lake, base, planned, vae_id, bool(done))
        if norm is None:
            norm = create_cache(lake, config, source, groups, per_site, plan, sites, planned)
    finally:
        lake.release_unit(stage, CACHE_UNIT)

    wanted = set(plan["unit"]) if units is None else set(units)
    busy: list[str] = []
    # plates are claimed one by one: a second run started on the same cache takes the plates this one has not
    claims = lake.claim_units(stage, [u for u in plan["unit"] if u not in done and u in wanted], busy)
    todo_units = list(itertools.islice(claims, max_units))
    log.info("ingest %s: %d plates (%d committed, %d claimed by another run), %d to do, %d sites", vae_id, len(plan),
             len(done), len(busy), len(todo_units), int(sites["unit"].isin(todo_units).sum()))
    try:
        if todo_units:
            encode_plates(ray, lake, config, source, groups, per_site, norm, plan, sites, todo_units)
    finally:
        for unit in todo_units:  # committed or not: a rerun (or another run) may take what this one left
            lake.release_unit(stage, unit)
    committed = lake.committed_units(stage)
    infos = [lake.unit_info(stage, u) for u in plan["unit"] if u in committed]
    summary = {"vae_id": vae_id, "units": len(plan), "units_written": len(todo_units),
               "units_skipped": len(done), "units_busy": len(busy),
               "units_committed": len(committed), "sites_planned": len(sites),
               **{k: int(sum(i[k] for i in infos)) for k in ("sites", "encoded_sites", "rejected", "crops")},
               "rows": int(plan["rows"].sum()), "seconds": round(time.perf_counter() - start, 2)}
    log.info("ingest: %s", summary)
    return summary


def reusable_cache(lake, base: str, planned: LatentCache, vae_id: str, has_plates: bool) -> im.Normalisation | None:
    """The normalisation of the existing cache at ``base`` when this run may add plates to it, else ``None``.

    A cache with committed plates must have been made with the same science fields (config, VAE, catalog), or
    the run is refused; resources may differ. A cache without committed plates is reused when its record
    matches (another run created it and is encoding), and created afresh otherwise.
    """
    if not has_plates and not (lake.exists(f"{base}/_artifact.json") and lake.exists(f"{base}/normalisation.json")):
        return None
    stored = read_record(lake, base, LatentCache, vae_id)
    if stored.fingerprint != planned.fingerprint:
        if not has_plates:
            return None
        raise UserError(f"{lake.uri_of(base)} was made with another config, VAE or catalog "
                        f"({', '.join(planned.changed_fields(stored))} differ); rerun with --force to rebuild "
                        "it, or pass --vae-id <new name>")
    return im.Normalisation.from_dict(lake.read_json(f"{base}/normalisation.json"))


def create_cache(lake, config: im.IngestConfig, source: dict, groups, per_site: int, plan: pd.DataFrame,
                 sites: pd.DataFrame, planned: LatentCache) -> im.Normalisation:
    """Compute the normalisation, create the (empty) latent array and write the cache's config and record."""
    vae_id, base = source["vae_id"], f"latents/{source['vae_id']}"
    train = select_sites(lake, "train") if config.subset != "train" else sites
    sample = stats_sample(train, config.stats_sites, config.seed)
    norm = compute_normalisation(lake, sample, config.illumination, config.low_percentile,
                                 config.high_percentile, config.read_concurrency, config.max_plane_bytes)
    log.info("ingest: normalisation over %d sites: low=%s high=%s", norm.n_sites,
             np.round(norm.low, 1).tolist(), np.round(norm.high, 1).tolist())
    model = load_autoencoder(lake, source, groups)
    record = replace(planned, normalisation_low=tuple(norm.low), normalisation_high=tuple(norm.high),
                     normalisation_sites=int(norm.n_sites), scaling_factor=model.scaling_factor)
    attrs = {"vae_id": vae_id, "scaling_factor": model.scaling_factor,
             "channel_groups": [list(g) for g in groups], "channels": list(c.CHANNELS),
             "normalisation": norm.to_dict(), "config": config_to_dict(config), "vae_source": source,
             "crop": {"mode": config.crop_mode, "size": config.crop_size, "tile_grid": config.tile_grid,
                      "crops_per_site": per_site},
             "row_assignment": "plates in catalog order, each a block of whole shards; see docs/ingest.md"}
    del model
    create_latents(lake, vae_id, int(plan["rows"].sum()), config.crop_size // 8, config.rows_per_shard, attrs)
    lake.write_json(f"{base}/normalisation.json", norm.to_dict())
    lake.write_config(base, config, extra={"vae_source": source})
    write_record(lake, base, record)
    return norm


#: upper bound on the number of input blocks (one driver-side list of site records is split into them)
MAX_INPUT_BLOCKS = 20_000


#: reader batches (``batch_size // crops per site`` sites each) per input block
BATCHES_PER_BLOCK = 4


def input_blocks(n_sites: int, config: im.IngestConfig, per_site: int) -> int:
    """How many blocks the site list is cut into: :data:`BATCHES_PER_BLOCK` reader batches per block, at least
    4 blocks per reader, at most :data:`MAX_INPUT_BLOCKS`.

    A block is the unit a reader hands on. With only 4 blocks per reader (the former rule) 5,000 sites made 8
    blocks of 625 sites (~25 CPU-s of reading each): the encoders idled until the first block was read and the
    readers while the last ones were encoded. One reader batch per block (16 sites) was slower still: 313
    blocks, and the per-block cost (task hand-over, batch conversion, the driver's scheduling) took more than
    the bubbles gave back (benchmarks/bench_scale.py; docs/benchmarks.md). The output does not depend on the block
    count: rows are placed by catalog order."""
    per_block = BATCHES_PER_BLOCK * max(1, config.batch_size // max(1, per_site))
    wanted = max(4 * config.read_concurrency, -(-n_sites // per_block))
    return max(1, min(n_sites, wanted, MAX_INPUT_BLOCKS))


def encode_plates(ray, lake, config: im.IngestConfig, source: dict, groups, per_site: int, norm: im.Normalisation,
                  plan: pd.DataFrame, sites: pd.DataFrame, todo_units: list[str]) -> None:
    """The Ray Data pipeline over the sites of ``todo_units``: read -> encode -> one write task per plate."""
    vae_id = source["vae_id"]
    todo = sites[sites["unit"].isin(todo_units)]
    items = [{"order": int(o), "unit": u, **rec} for o, u, rec in
             zip(todo["order"], todo["unit"], site_records(todo))]
    meta_cols = [c.SOURCE.name, c.BATCH.name, c.PLATE.name, c.WELL.name, c.SITE.name, c.JCP2022.name,
                 c.PERT_TYPE.name]
    sites_meta = todo.set_index("Metadata_SiteKey")[meta_cols].to_dict("index")
    plan_map = {u: (int(o), int(r)) for u, o, r in zip(plan["unit"], plan["offset"], plan["rows"])}
    cfg_dict = config_to_dict(config)
    ctx = ray.data.DataContext.get_current()
    strategy = ctx.shuffle_strategy
    # a sort-based shuffle needs no aggregator actors: the CPUs stay with the readers and encoders
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        reader = dict(endpoint_url=lake.endpoint_url, illumination=config.illumination, normalisation=norm.to_dict(),
                      crop_mode=config.crop_mode, crop_size=config.crop_size, tile_grid=config.tile_grid,
                      max_plane_bytes=config.max_plane_bytes)
        encoder = dict(lake=lake, source=source, groups=groups, num_threads=max(1, int(config.num_cpus_encode)))
        sites_per_batch = max(1, config.batch_size // per_site)
        ds = ray.data.from_items(items, override_num_blocks=input_blocks(len(items), config, per_site))
        if config.fuse_read_encode:
            cpus = config.num_cpus_read + config.num_cpus_encode
            ds = ds.map_batches(ReadEncoder, fn_constructor_kwargs=dict(
                reader=reader, encoder=encoder | {"num_threads": max(1, int(cpus))}),
                compute=ray.data.ActorPoolStrategy(size=config.read_concurrency), num_cpus=cpus,
                batch_size=sites_per_batch, batch_format="numpy")
        else:
            ds = ds.map_batches(SiteReader, fn_constructor_kwargs=reader,
                                compute=ray.data.ActorPoolStrategy(size=config.read_concurrency),
                                num_cpus=config.num_cpus_read, batch_size=sites_per_batch, batch_format="numpy")
            ds = ds.map_batches(Encoder, fn_constructor_kwargs=encoder,
                                compute=ray.data.ActorPoolStrategy(size=config.encode_concurrency),
                                num_gpus=config.num_gpus or None, num_cpus=config.num_cpus_encode,
                                batch_size=config.batch_size, batch_format="numpy")
        ds = ds.groupby("unit", num_partitions=len(todo_units)).map_groups(
            write_unit, batch_format="numpy", num_cpus=0.5, fn_kwargs=dict(
                lake=lake, vae_id=vae_id, plan=plan_map, sites_meta=sites_meta, config=cfg_dict))
        for row in ds.iter_rows():
            log.info("ingest %s: plate %s: %d sites, %d crops, %d rejected", vae_id, row["unit"], row["sites"],
                     row["crops"], row["rejected"])
        # where the time went, per operator (read, encode, shuffle, write): shown with --verbose
        log.info("ingest %s: Ray Data stats\n%s", vae_id, ds.stats())
    finally:
        ctx.shuffle_strategy = strategy


def read_normalisation(lake, vae_id: str) -> im.Normalisation:
    """The normalisation a latent cache was made with (generate, vae-recon and the gallery de-normalise with it:
    ``.to_dict()`` is what travels to their actors). One-line error when missing or not one value per channel."""
    rel = f"latents/{vae_id}/normalisation.json"
    if not lake.exists(rel):
        raise UserError(f"{lake.uri_of(rel)} is missing: mapping images back to grey levels needs the ingest "
                        "normalisation statistics; run `cpldm ingest` first")
    norm = lake.read_json(rel)
    if len(norm.get("low", [])) != len(c.CHANNELS) or len(norm.get("high", [])) != len(c.CHANNELS):
        raise UserError(f"{lake.uri_of(rel)}: expected {len(c.CHANNELS)} 'low' and {len(c.CHANNELS)} 'high' values")
    return im.Normalisation.from_dict(norm)


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = subparsers.add_parser("ingest", help="TIFFs -> normalised crops -> channel-group VAE latents (Zarr)",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, im.INGEST_PRESETS, im.IngestConfig)
    p.add_argument("--vae", default=None, help="fitted VAE name in the lake, a diffusers directory or a model id")
    p.add_argument("--vae-subfolder", default=None, help="subfolder for from_pretrained (e.g. vae)")
    p.add_argument("--vae-id", default=None, type=lake_name,
                   help="name of the latent cache (default: derived from --vae)")
    p.add_argument("--plates", default=None, help="comma-separated plate units to do (default: all)")
    p.add_argument("--max-plates", type=int, default=None, help="stop after this many new plates")
    p.add_argument("--force", action="store_true", help="forget committed plates and rebuild")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.cli import config_from_args, lake_from_args

    flags = [f"{key}={val}" for key, val in (("vae", args.vae), ("vae_subfolder", args.vae_subfolder),
                                              ("vae_id", args.vae_id)) if val is not None]
    cfg = config_from_args(im.IngestConfig, im.INGEST_PRESETS, args, flags)
    units = [u for u in args.plates.split(",") if u] if args.plates else None
    summary = run(lake_from_args(args), cfg, units=units, max_units=args.max_plates, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["run", "add_parser", "SiteReader", "Encoder", "resolve_vae", "load_autoencoder", "plan_units",
           "lake_vaes", "vae_ref", "latent_cache_record", "read_latent_cache",
           "read_normalisation", "compute_normalisation", "stats_sample"]
