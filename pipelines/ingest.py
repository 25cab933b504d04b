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
rows: exactly-once per plate.

Normalisation statistics are computed once (before any plate is written) over a deterministic sample of
training sites and stored in ``latents/<vae_id>/normalisation.json`` and the array attributes; a resumed run
reuses them.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core import images as im
from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.load_data import hash_rank, training_sites
from storage_schemas import columns as c
from storage_schemas.zarr_layouts import LATENTS

log = logging.getLogger(__name__)

STAGE_PREFIX = "ingest"
#: Config keys that only choose resources: they may change between a run and its resumption.
RESOURCE_KEYS = ("read_concurrency", "num_cpus_read", "encode_concurrency", "num_gpus", "num_cpus_encode", "batch_size")
#: Illumination functions kept per reader (one plate's 5 arrays each).
ILLUM_CACHE_PLATES = 4
VAE_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def stage_name(vae_id: str) -> str:
    return f"{STAGE_PREFIX}-{vae_id}"


def unit_name(source: str, batch: str, plate: str) -> str:
    """Marker/part name of a plate (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{source}__{batch}__{plate}")


# ---------------------------------------------------------------------------------------------- VAE location
def sanitise_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip("/")).strip("-") or "vae"


def resolve_vae(lake, vae: str, subfolder: str | None, vae_id: str = "") -> dict:
    """Where the VAE comes from: ``{"vae_id", "kind": "lake"|"pretrained", "path", "subfolder"}``.

    ``vae`` names a VAE fitted into the lake (``vae/<vae>/config.json`` exists) or else a local diffusers
    directory / model id for ``AutoencoderKL.from_pretrained``. ``vae_id`` defaults to the lake name, or to
    the path/id made file-name safe (``stabilityai/sdxl-vae`` -> ``stabilityai--sdxl-vae``).
    """
    if not vae:
        raise UserError("no VAE given: pass --vae (a fitted VAE name in the lake, a path or a model id)")
    rel = f"vae/{vae}"
    if "/" not in vae.strip("/") and lake.exists(f"{rel}/config.json"):
        return {"vae_id": vae_id or vae, "kind": "lake", "path": rel, "subfolder": None}
    name = os.path.basename(vae.rstrip("/")) if os.path.isdir(vae) else vae
    default_id = sanitise_id(name + (f"--{subfolder}" if subfolder else ""))
    return {"vae_id": vae_id or default_id, "kind": "pretrained", "path": vae, "subfolder": subfolder}


def load_autoencoder(lake, source: dict, groups):
    """``ChannelGroupAutoencoder`` from a :func:`resolve_vae` result (lake VAEs on S3 are copied to a tmp dir)."""
    from cpldm_core.autoencoder import ChannelGroupAutoencoder

    if source["kind"] == "pretrained":
        return ChannelGroupAutoencoder.from_pretrained(source["path"], subfolder=source["subfolder"], groups=groups)
    if not lake.is_s3:
        return ChannelGroupAutoencoder.from_pretrained(lake.fs_path(source["path"]), groups=groups)
    with tempfile.TemporaryDirectory(prefix="cpldm-vae-") as tmp:
        for name in VAE_WEIGHT_FILES:
            if lake.exists(f"{source['path']}/{name}"):
                with open(os.path.join(tmp, name), "wb") as fh:
                    fh.write(lake.read_bytes(f"{source['path']}/{name}"))
        return ChannelGroupAutoencoder.from_pretrained(tmp, groups=groups)


# ---------------------------------------------------------------------------------------------- reading
class SiteReader:
    """Reads sites (5 TIFFs + optional illumination functions) from local paths or S3.

    Callable on a Ray Data numpy batch with ``URL_Orig<ch>``/``URL_Illum<ch>`` columns; also usable directly.
    Holds one S3 client (requests for a batch's files go out concurrently) and a small illum cache.
    """

    def __init__(self, endpoint_url: str | None = None, illumination: str = "auto",
                 normalisation: dict | None = None, crop_mode: str = "centre", crop_size: int = 0,
                 tile_grid: int = 2):
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.illumination = illumination
        self.norm = im.Normalisation.from_dict(normalisation) if normalisation else None
        self.crop_mode, self.crop_size, self.tile_grid = crop_mode, crop_size, tile_grid
        self._s3 = None
        self._illum: OrderedDict = OrderedDict()

    # -- bytes
    def fetch(self, uris: list[str]) -> list[bytes | Exception]:
        """Bytes of each URI (an exception object in place of a file that cannot be read)."""
        out: list[bytes | Exception] = [b""] * len(uris)
        s3_idx = [i for i, u in enumerate(uris) if u.startswith("s3://")]
        for i, u in enumerate(uris):
            if i in s3_idx:
                continue
            try:
                with open(u[7:] if u.startswith("file://") else u, "rb") as fh:
                    out[i] = fh.read()
            except OSError as exc:
                out[i] = exc
        if s3_idx:
            if self._s3 is None:
                from pipelines.storage import s3_filesystem
                self._s3 = s3_filesystem(self.endpoint_url)
            paths = [uris[i][5:] for i in s3_idx]
            got = self._s3.cat(paths, on_error="return")
            for i, p in zip(s3_idx, paths):
                out[i] = got.get(p, FileNotFoundError(p))
        return out

    def illum_for(self, urls: tuple[str, ...]) -> np.ndarray:
        if urls not in self._illum:
            arrays = []
            for u, data in zip(urls, self.fetch(list(urls))):
                if isinstance(data, Exception):
                    raise im.ImageError(f"{u}: cannot read illumination function ({type(data).__name__}: {data})")
                try:
                    arrays.append(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
                except Exception as exc:
                    raise im.ImageError(f"{u}: not a .npy illumination function ({exc})") from None
            self._illum[urls] = np.stack(arrays)
            while len(self._illum) > ILLUM_CACHE_PLATES:
                self._illum.popitem(last=False)
        return self._illum[urls]

    # -- sites
    def read_sites(self, rows: list[dict]) -> list[np.ndarray | im.ImageError]:
        """Each row -> ``(5, H, W) float32`` grey levels (illumination-corrected) or the ImageError why not."""
        uris = [str(r[f"URL_Orig{ch}"]) for r in rows for ch in c.CHANNELS]
        blobs = self.fetch(uris)
        out: list = []
        for k, r in enumerate(rows):
            try:
                chans = []
                for j, ch in enumerate(c.CHANNELS):
                    data, uri = blobs[5 * k + j], uris[5 * k + j]
                    if isinstance(data, Exception):
                        raise im.ImageError(f"{uri}: cannot read ({type(data).__name__}: {data})")
                    chans.append(im.decode_tiff(data, uri))
                img = im.stack_channels(chans, list(c.CHANNELS)).astype(np.float32)
                illum = tuple(str(r.get(f"URL_Illum{ch}") or "") for ch in c.CHANNELS)
                if self.illumination == "auto" and all(illum):
                    img = im.apply_illumination(img, self.illum_for(illum))
                out.append(img)
            except im.ImageError as exc:
                out.append(exc)
        return out

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
                          concurrency: int = 2) -> im.Normalisation:
    """Global per-channel robust percentiles over ``sample`` sites (read in Ray tasks; unreadable skipped)."""
    import ray

    reader_args = dict(endpoint_url=lake.endpoint_url, illumination=illumination)

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
            z = self.model.encode(self.torch.from_numpy(np.ascontiguousarray(x[ok])))
            lat[ok] = z.float().cpu().numpy().astype(np.float16)
        batch["latent"] = lat
        return batch


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


def run(lake, config: im.IngestConfig, units: list[str] | None = None, max_units: int | None = None,
        force: bool = False) -> dict:
    """Encode the catalogued sites into ``latents/<vae_id>/``; committed plates are skipped.

    Args:
        units: only these plate units (names as in ``plan``: ``<source>__<batch>__<plate>``).
        max_units: stop after this many new plates (to split work, and to test resumption).
        force: forget committed plates and rebuild the cache from scratch.
    Returns:
        {"vae_id", "sites", "encoded_sites", "rejected", "crops", "units", "units_written", "units_skipped",
         "rows", "seconds"} -- counts over all committed units, so sites = encoded_sites + rejected.
    """
    from cpldm_core.autoencoder import check_groups
    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    ray = ensure_ray()
    groups = check_groups(config.channel_groups)
    source = resolve_vae(lake, config.vae, config.vae_subfolder, config.vae_id)
    vae_id = source["vae_id"]
    config = replace(config, vae_id=vae_id)
    stage, base = stage_name(vae_id), f"latents/{vae_id}"
    sites = select_sites(lake, config.subset)
    if sites.empty:
        raise UserError(f"ingest: no sites in subset {config.subset!r}; check catalog/split tables")
    per_site = im.crops_per_site(config.crop_mode, config.tile_grid)
    plan = plan_units(sites, per_site, config.rows_per_shard)
    sites = sites.merge(plan[["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "unit"]], how="left")
    sites["order"] = np.arange(len(sites))
    fingerprint = {"config": {k: v for k, v in config_to_dict(config).items() if k not in RESOURCE_KEYS},
                   "vae": source, "plan": plan[["unit", "offset", "rows", "sites"]].to_dict("list")}
    if force:
        lake.reset_stage(stage)
    done = lake.committed_units(stage)
    if done:
        state = lake.read_json(f"{base}/ingest_state.json") if lake.exists(f"{base}/ingest_state.json") else None
        if state != json.loads(json.dumps(fingerprint, default=str)):
            raise UserError(f"{lake.uri_of(base)} was made with another config, VAE or catalog; rerun with --force "
                            "to rebuild it, or pass --set vae_id=<new name>")
        norm = im.Normalisation.from_dict(lake.read_json(f"{base}/normalisation.json"))
    else:
        train = select_sites(lake, "train") if config.subset != "train" else sites
        sample = stats_sample(train, config.stats_sites, config.seed)
        norm = compute_normalisation(lake, sample, config.illumination, config.low_percentile,
                                     config.high_percentile, config.read_concurrency)
        log.info("ingest: normalisation over %d sites: low=%s high=%s", norm.n_sites,
                 np.round(norm.low, 1).tolist(), np.round(norm.high, 1).tolist())
        model = load_autoencoder(lake, source, groups)
        attrs = {"vae_id": vae_id, "scaling_factor": model.scaling_factor,
                 "channel_groups": [list(g) for g in groups], "channels": list(c.CHANNELS),
                 "normalisation": norm.to_dict(), "config": config_to_dict(config), "vae_source": source,
                 "crop": {"mode": config.crop_mode, "size": config.crop_size, "tile_grid": config.tile_grid,
                          "crops_per_site": per_site},
                 "row_assignment": "plates in catalog order, each a block of whole shards; see docs/ingest.md"}
        del model
        create_latents(lake, vae_id, int(plan["rows"].sum()), config.crop_size // 8, config.rows_per_shard, attrs)
        lake.write_json(f"{base}/normalisation.json", norm.to_dict())
        lake.write_json(f"{base}/ingest_state.json", fingerprint)
        lake.write_config(base, config, extra={"vae_source": source})

    todo_units = [u for u in plan["unit"] if u not in done and (units is None or u in set(units))]
    if max_units is not None:
        todo_units = todo_units[:max_units]
    log.info("ingest %s: %d plates (%d committed), %d to do, %d sites", vae_id, len(plan), len(done),
             len(todo_units), int(sites["unit"].isin(todo_units).sum()))
    if todo_units:
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
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * config.read_concurrency)))
            ds = ds.map_batches(SiteReader, fn_constructor_kwargs=dict(
                endpoint_url=lake.endpoint_url, illumination=config.illumination, normalisation=norm.to_dict(),
                crop_mode=config.crop_mode, crop_size=config.crop_size, tile_grid=config.tile_grid),
                compute=ray.data.ActorPoolStrategy(size=config.read_concurrency), num_cpus=config.num_cpus_read,
                batch_size=max(1, config.batch_size // per_site), batch_format="numpy")
            ds = ds.map_batches(Encoder, fn_constructor_kwargs=dict(
                lake=lake, source=source, groups=groups, num_threads=max(1, int(config.num_cpus_encode))),
                compute=ray.data.ActorPoolStrategy(size=config.encode_concurrency), num_gpus=config.num_gpus or None,
                num_cpus=config.num_cpus_encode, batch_size=config.batch_size, batch_format="numpy")
            ds = ds.groupby("unit", num_partitions=len(todo_units)).map_groups(
                write_unit, batch_format="numpy", num_cpus=0.5, fn_kwargs=dict(
                    lake=lake, vae_id=vae_id, plan=plan_map, sites_meta=sites_meta, config=cfg_dict))
            for row in ds.iter_rows():
                log.info("ingest %s: plate %s: %d sites, %d crops, %d rejected", vae_id, row["unit"], row["sites"],
                         row["crops"], row["rejected"])
        finally:
            ctx.shuffle_strategy = strategy
    committed = lake.committed_units(stage)
    infos = [lake.unit_info(stage, u) for u in plan["unit"] if u in committed]
    summary = {"vae_id": vae_id, "units": len(plan), "units_written": len(todo_units),
               "units_skipped": len(done),
               "units_committed": len(committed), "sites_planned": len(sites),
               **{k: int(sum(i[k] for i in infos)) for k in ("sites", "encoded_sites", "rejected", "crops")},
               "rows": int(plan["rows"].sum()), "seconds": round(time.perf_counter() - start, 2)}
    log.info("ingest: %s", summary)
    return summary


def read_normalisation(lake, vae_id: str) -> im.Normalisation:
    """The normalisation a latent cache was made with (generation de-normalises with it)."""
    return im.Normalisation.from_dict(lake.read_json(f"latents/{vae_id}/normalisation.json"))


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments

    p = subparsers.add_parser("ingest", help="TIFFs -> normalised crops -> channel-group VAE latents (Zarr)",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, im.INGEST_PRESETS, im.IngestConfig)
    p.add_argument("--vae", default=None, help="fitted VAE name in the lake, a diffusers directory or a model id")
    p.add_argument("--vae-subfolder", default=None, help="subfolder for from_pretrained (e.g. vae)")
    p.add_argument("--vae-id", default=None, help="name of the latent cache (default: derived from --vae)")
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
           "read_normalisation", "compute_normalisation", "stats_sample"]
