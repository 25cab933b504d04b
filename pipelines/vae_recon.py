"""``cpldm vae-recon``: real crops through the VAE alone (encode -> decode), stored as a generation run.

The ceiling of every generated arm: whatever the VAE loses (texture, faint channels, small objects) no diffusion
model sampling in its latent space can bring back. The run is written exactly like a ``cpldm generate`` run
(``synthetic/<run>/images.zarr`` (N, 5, H, W) uint16, ``synthetic_manifest`` parts, block markers of
``generate-<run>``, ``synthetic/<run>/config.json``) with generate's own writers, so ``cpldm profile --dataset
vae-recon`` profiles it like any synthetic run and ``cpldm evaluate`` names it the data type ``vae-recon``.

Recipe:

1. sites: the catalog's real sites (``--sites evaluated``, the default: the rows the ``real`` arm is evaluated
   on -- every DMSO well (its plate's normalisation), unseen compounds in every batch, seen compounds only in
   held-out batches (or in all batches when they have no held-out well), :func:`recipe.heldout_profile_rows`;
   ``--sites all``: every site);
2. latents: a site's crops from the ingest latent cache (``latents/<vae_id>/``, table ``latent_index``) when it
   is there; ingest encodes only training sites (``subset=train``), so the other sites are read, normalised,
   cropped and encoded now with ingest's own reader and the cache's VAE (float16, like the cache);
3. decode with the cache's VAE -> :func:`cpldm_core.images.denormalise` with the cache's normalisation -> uint16
   (exactly what generation stores for a decoded model image);
4. real metadata kept: compound, source, batch, well; each real plate is one "draw" (``Metadata_Draw`` = plate
   index, so profile's ``Metadata_Plate = draw-<index>`` is one-to-one with the real plate and the plate's crops
   are normalised against that plate's DMSO wells, as the real wells are); the crops of one well are one
   well row, like a real well's sites. ``config.json`` lists which real plate each index is.

Resumable: one unit of work per block of ``block_size`` rows (its image rows, its manifest part, its marker).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from cpldm_core.configuration import bounds, check_name
from cpldm_core.errors import UserError
from storage_schemas.artifacts import GenerationRun, InputRef, LatentCache, fingerprint_of, read_artifact

log = logging.getLogger(__name__)

#: Default run (and features dataset, and evaluation data type) name.
RUN = "vae-recon"
#: ``model_kind`` recorded in the run's config.json and manifest: how evaluate recognises the run.
KIND = "vae-recon"
#: ``Metadata_Seed`` of a crop encoded now (not in the latent cache); cached crops carry their latent row.
NOT_CACHED = -1


@dataclass(frozen=True)
class VaeReconConfig:
    """What ``cpldm vae-recon`` does.

    Attributes:
        run: run name (``synthetic/<run>/``; the profile dataset and the evaluation data type).
        vae_id: latent cache (``latents/<vae_id>/``) whose VAE, normalisation and crops are used; "" = the only one.
        sites: ``evaluated`` (the rows the real arm is evaluated on, see the module docstring) or ``all``.
        block_size: crops per unit of work (one manifest part, one marker, one zarr shard).
        batch_size: crops per VAE call.
        actors: Ray actors (each loads the VAE once); 0 = in the driver, no Ray.
        cpus_per_actor / gpus_per_actor: resources of one actor.
        device: torch device (``auto``: cuda when an actor has a GPU, else cpu).
    """

    run: str = RUN
    vae_id: str = ""
    sites: Literal["evaluated", "all"] = "evaluated"
    block_size: int = field(default=64, metadata=bounds(ge=1))
    batch_size: int = field(default=16, metadata=bounds(ge=1))
    actors: int = field(default=1, metadata=bounds(ge=0))
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    device: str = "auto"


PRESETS = {"tiny": VaeReconConfig(block_size=16, batch_size=8), "demo": VaeReconConfig(),
           "paper": VaeReconConfig(block_size=256, batch_size=32, actors=4, gpus_per_actor=1.0)}


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Rows:
    """The part of a generation design that generate's writers read (``prepare_images_array``): row and block
    counts. A reconstruction has no draws of confounders: each real plate is one draw."""

    n_rows: int
    block_size: int
    draws: int
    kind: str = "real-sites"

    @property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_size)


def select_sites(lake, which: str) -> pd.DataFrame:
    """Catalog sites to reconstruct, in catalog order: all, or the rows the real arm is evaluated on."""
    from cpldm_core.evaluation.recipe import control_rows, heldout_profile_rows

    sites = lake.read_named("sites").to_pandas()
    if sites.empty:
        raise UserError("the catalog table 'sites' is empty; run `cpldm catalog` first")
    if which == "all":
        return sites.reset_index(drop=True)
    split, heldout = None, set()
    if _has(lake, "split_compounds"):
        frame = lake.read_named("split_compounds").to_pandas()
        split = frame.set_index("Metadata_JCP2022")["Metadata_CompoundSplit"].astype(str)
    if _has(lake, "split_batches"):
        frame = lake.read_named("split_batches").to_pandas()
        heldout = set(frame.loc[frame["Metadata_BatchSplit"].astype(str) == "heldout", "Metadata_Batch"].astype(str))
    is_control = control_rows(sites)
    rows, _ = heldout_profile_rows(sites, split, heldout, is_control)
    return sites[rows | is_control].reset_index(drop=True)


def _has(lake, table: str) -> bool:
    import storage_schemas
    return lake.exists(storage_schemas.table_spec(table).path)


def plan_rows(sites: pd.DataFrame, index: pd.DataFrame, per_site: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per crop to reconstruct: sites in order, crops 0..per_site-1; ``Metadata_Seed`` = the crop's
    latent-cache row or ``NOT_CACHED``; ``Metadata_Draw`` = index of the site's real plate (catalog order).
    Returns (rows, the real plates [source, batch, plate] in draw order)."""
    plates = sites[["Metadata_Source", "Metadata_Batch", "Metadata_Plate"]].drop_duplicates().reset_index(drop=True)
    plate_index = {tuple(k): i for i, k in enumerate(plates.itertuples(index=False))}
    cached = dict(zip(zip(index["Metadata_SiteKey"].astype(str), index["Metadata_Crop"].astype(int)),
                      index["Metadata_LatentRow"].astype(np.int64)))
    rep = sites.loc[sites.index.repeat(per_site)].reset_index(drop=True)
    rep["Metadata_Crop"] = np.tile(np.arange(per_site), len(sites))
    rep["Metadata_Seed"] = [int(cached.get((str(k), int(c)), NOT_CACHED))
                            for k, c in zip(rep["Metadata_SiteKey"], rep["Metadata_Crop"])]
    rep["Metadata_Draw"] = [plate_index[(s, b, p)] for s, b, p in
                            zip(rep["Metadata_Source"], rep["Metadata_Batch"], rep["Metadata_Plate"])]
    rep["Metadata_DesignRow"] = np.arange(len(rep), dtype=np.int64)
    return rep, plates


@dataclass(frozen=True)
class ReconJob:
    """What a worker needs (picklable): the generation job generate's writers take, the crop plan and the cache."""

    gen: object                 # pipelines.generate.GenerationJob
    rows: pd.DataFrame          # plan_rows() output + URL columns
    vae_id: str
    vae_source: dict
    ingest: dict                # the cache's ingest config (crop, illumination)
    device: str
    threads: int


def plan(lake, config: VaeReconConfig) -> tuple[ReconJob, pd.DataFrame]:
    """The job (generation job for generate's writers, crop plan, cache) and the real plates, in draw order."""
    from pipelines import generate, ingest
    from pipelines.generate import GenerationJob, ModelInfo

    try:
        vae_id = config.vae_id or generate._only_latent_cache(lake)
    except UserError:
        raise UserError(f"vae-recon decodes the latent cache of `cpldm ingest`, and {lake.uri_of('latents')} holds "
                        "none or several: run `cpldm ingest`, or pass --vae-id <vae_id>") from None
    record = ingest.read_latent_cache(lake, vae_id)
    source, ing = ingest.recorded_vae_source(lake, vae_id)
    norm = ingest.read_normalisation(lake, vae_id).to_dict()
    sites = select_sites(lake, config.sites)
    index_path = f"latents/index/vae={vae_id}"
    index = lake.read_table(index_path).to_pandas() if lake.exists(index_path) else \
        pd.DataFrame(columns=["Metadata_SiteKey", "Metadata_Crop", "Metadata_LatentRow"])
    rows, plates = plan_rows(sites, index, int(record.crops_per_site))
    rows["Metadata_Block"] = (rows["Metadata_DesignRow"] // config.block_size).astype(np.int64)
    spec = _Rows(n_rows=len(rows), block_size=config.block_size, draws=len(plates))
    model = ModelInfo(model_run=f"vae:{vae_id}", rel_dir="", kind=KIND, vocab={}, metadata={"vae_id": vae_id},
                      latent_shape=tuple(int(v) for v in record.latent_shape), compound_input="")
    gen = GenerationJob(gen_run=config.run, spec=spec, model=model, encoder="", vae_location=record.vae_location,
                        vae_subfolder=record.vae_subfolder, vae_id=vae_id,
                        channel_groups=tuple(tuple(g) for g in record.channel_groups), normalisation=norm,
                        sampler="none", steps=0, guidance_scale=1.0, batch_size=config.batch_size,
                        device="cpu" if config.gpus_per_actor <= 0 and config.device == "auto" else config.device,
                        threads=max(1, int(config.cpus_per_actor)), export_tiff=False)
    job = ReconJob(gen=gen, rows=rows, vae_id=vae_id, vae_source=source, ingest=ing, device=gen.device,
                   threads=gen.threads)
    return job, plates


def check_run_config(lake, job: ReconJob, config: VaeReconConfig, plates: pd.DataFrame) -> dict:
    """Write ``synthetic/<run>/config.json`` or refuse to resume a run made from other sites or another cache."""
    from pipelines.generate import write_or_refuse_run

    rows = job.rows
    record = {"run": config.run, "model_run": job.gen.model.model_run, "model_kind": KIND, "vae_recon": True,
              "oracle": None, "vae_id": job.vae_id, "sites": config.sites,
              "n_sites": int(rows["Metadata_SiteKey"].nunique()),
              "n_images": len(rows), "crops_from_cache": int((rows["Metadata_Seed"] != NOT_CACHED).sum()),
              "crops_encoded_now": int((rows["Metadata_Seed"] == NOT_CACHED).sum()), "draws": len(plates),
              "plates": "one per real plate: Metadata_Draw = index into real_plates (catalog order)",
              "real_plates": plates.to_dict("list"), "block_size": config.block_size,
              "image_shape": list(job.gen.image_shape), "normalisation": job.gen.normalisation,
              "rows_fingerprint": fingerprint_of(rows[["Metadata_SiteKey", "Metadata_Crop", "Metadata_Seed"]]
                                                  .astype(str).to_numpy().tolist())}
    planned = generation_record(lake, job, config, record)
    write_or_refuse_run(lake, config.run, config, record, planned,
                        keys=("model_kind", "vae_id", "rows_fingerprint", "block_size", "image_shape"))
    return record


def generation_record(lake, job: ReconJob, config: VaeReconConfig, record: dict) -> GenerationRun:
    """The run's GenerationRun record (what ``cpldm profile`` reads as its input ``images``): inputs ``latents``
    (the LatentCache whose VAE, normalisation and crops it uses) and ``catalog`` (the reconstructed crops)."""
    from pipelines.storage import code_version

    inputs = {"latents": read_artifact(lake, LatentCache, job.vae_id).ref(),
              "catalog": InputRef(kind="Catalog", id="sites", fingerprint=record["rows_fingerprint"])}
    science = {"kind": KIND, "sites": config.sites, "block_size": config.block_size,
               "image_shape": record["image_shape"]}
    resources = {k: getattr(config, k) for k in ("batch_size", "actors", "cpus_per_actor", "gpus_per_actor", "device")}
    return GenerationRun(id=config.run, inputs=inputs, config=science, resources=resources,
                         code_version=code_version(), model_run="", design=KIND, draws=record["draws"],
                         compounds=config.sites, sampler="none", sampler_steps=0, seed_namespace="", oracle=None,
                         rows=record["n_images"])


# ---------------------------------------------------------------------------------------------- reading crops
def crop_reader(lake, ingest_config: dict, normalisation: dict):
    """Ingest's site reader set up as the latent cache was made (illumination, normalisation, crop)."""
    from cpldm_core.images import DEFAULT_MAX_PLANE_BYTES
    from pipelines.ingest import SiteReader

    ing = ingest_config
    if not ing.get("crop_size"):
        raise UserError("the latent cache's config.json records no crop_size; rerun `cpldm ingest --force`")
    return SiteReader(lake.endpoint_url, illumination=str(ing.get("illumination", "auto")), normalisation=normalisation,
                      crop_mode=str(ing.get("crop_mode", "centre")), crop_size=int(ing["crop_size"]),
                      tile_grid=int(ing.get("tile_grid", 2)),
                      max_plane_bytes=int(ing.get("max_plane_bytes", 0)) or DEFAULT_MAX_PLANE_BYTES)


def read_crops(reader, rows: pd.DataFrame) -> np.ndarray:
    """``(n, 5, S, S) float32`` crops in [-1, 1] of catalog rows (``Metadata_SiteKey``, URL columns and
    ``Metadata_Crop``), in row order, read by ingest's reader. An unreadable site is a one-line error."""
    from pipelines.ingest import site_records

    records = site_records(rows.drop_duplicates("Metadata_SiteKey"))
    batch = {k: np.asarray([r[k] for r in records]) for k in records[0]}
    batch["order"] = np.arange(len(records))
    batch["unit"] = np.asarray(["crops"] * len(records))
    out = reader(batch)
    bad = ~out["ok"].astype(bool)
    if bad.any():
        raise UserError(f"site {out['Metadata_SiteKey'][bad][0]} cannot be read: {out['reason'][bad][0]}")
    where = {(str(k), int(c)): i for i, (k, c) in enumerate(zip(out["Metadata_SiteKey"], out["crop"]))}
    pick = [where[(str(k), int(c))] for k, c in zip(rows["Metadata_SiteKey"], rows["Metadata_Crop"])]
    return np.ascontiguousarray(out["image"][pick])


# ---------------------------------------------------------------------------------------------- the worker
class BlockReconstructor:
    """VAE-holding worker: ``(block)`` -> latents (cache or encoded now) -> decode -> uint16 rows + manifest part.

    Usable without Ray (tests, ``actors=0``); in a run it is a Ray actor.
    """

    def __init__(self, lake, job: ReconJob):
        import torch

        from pipelines import ingest

        self.lake, self.job = lake, job
        torch.set_num_threads(max(1, job.threads))
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if job.device == "auto" else job.device)
        self.autoencoder = ingest.load_autoencoder(lake, job.vae_source, job.gen.channel_groups).to(self.device)
        self.latents = ingest.open_latents(lake, job.vae_id, mode="r")
        self.reader = crop_reader(lake, job.ingest, job.gen.normalisation)
        self.images = None

    def encode_sites(self, rows: pd.DataFrame) -> np.ndarray:
        """Latents ``(n, 8, h, w) float16`` of crops not in the cache: ingest's reader (illumination, global
        normalisation, crop) and the cache's VAE, rounded to float16 as the cache stores them."""
        import torch

        return self.autoencoder.encode_cached(torch.from_numpy(read_crops(self.reader, rows)))

    def block_latents(self, rows: pd.DataFrame) -> np.ndarray:
        """Latents of a block's rows, in row order: cached rows read from the cache, the others encoded now."""
        seeds = rows["Metadata_Seed"].to_numpy()
        latents = np.empty((len(rows), *self.job.gen.model.latent_shape), np.float16)
        cached = seeds != NOT_CACHED
        if cached.any():
            latents[cached] = np.stack([np.asarray(self.latents[int(r)]) for r in seeds[cached]])
        if (~cached).any():
            latents[~cached] = self.encode_sites(rows[~cached])
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """``(n, 8, h, w)`` latents -> ``(n, 5, 8h, 8w) uint16``, exactly as generation stores a decoded image."""
        return decode_stored(self.autoencoder, latents, self.job.gen.normalisation, self.job.gen.batch_size)

    def __call__(self, block: int) -> dict:
        import zarr

        from pipelines import generate

        t0 = time.perf_counter()
        job = self.job
        rows = job.rows[job.rows["Metadata_Block"] == block]
        images = self.decode(self.block_latents(rows))
        if self.images is None:
            self.images = zarr.open_array(self.lake.zarr_store(generate.images_path(job.gen.gen_run)),
                                          path=generate.IMAGES_ARRAY, mode="r+")
        start = int(rows["Metadata_DesignRow"].iloc[0])
        self.images[start:start + len(rows)] = images
        generate.write_manifest(self.lake, job.gen, block, design_frame(rows))
        return {"block": block, "images": len(rows), "seconds": time.perf_counter() - t0}

    def gen(self, block: int) -> dict:   # Ray actors are called through a named method
        return self(block)


def decode_stored(autoencoder, latents: np.ndarray, normalisation: dict, batch_size: int) -> np.ndarray:
    """``(n, 8, h, w)`` scaled latents (float16 as cached, or float32) -> ``(n, 5, 8h, 8w) uint16``: decoded by
    ``autoencoder`` in batches of ``batch_size`` and stored with
    :func:`cpldm_core.images.denormalise` (the cache's ``normalisation``), as generation stores a decoded image."""
    import torch

    from cpldm_core.autoencoder import DOWNSAMPLE
    from cpldm_core.images import denormalise

    low, high = normalisation["low"], normalisation["high"]
    n, _, h, w = latents.shape
    out = np.empty((n, autoencoder.n_channels, h * DOWNSAMPLE, w * DOWNSAMPLE), np.uint16)
    for start in range(0, n, batch_size):   # decode() moves z to the VAE's device
        z = torch.from_numpy(np.asarray(latents[start:start + batch_size], dtype=np.float32))
        out[start:start + len(z)] = denormalise(autoencoder.decode(z).float().cpu().numpy(), low, high)
    return out


def design_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Plan rows as ``generation_design`` rows (its columns, in its order; replicate 0)."""
    design = rows.assign(Metadata_Replicate=np.int32(0))[
        ["Metadata_DesignRow", "Metadata_Block", "Metadata_JCP2022", "Metadata_Draw", "Metadata_Replicate",
         "Metadata_Source", "Metadata_Batch", "Metadata_Well", "Metadata_Seed"]].reset_index(drop=True)
    return design.astype({"Metadata_Draw": np.int32, "Metadata_Seed": np.int64})


def write_design(lake, job: ReconJob, config: VaeReconConfig) -> None:
    """The whole plan as the run's ``generation_design`` (one part, committed once): what was asked for, so the
    run reads like a generation run (design rows = manifest rows once every block is done)."""
    import pyarrow as pa

    from pipelines import generate

    stage, unit = generate.design_stage(config.run), "part-000000"
    if unit in lake.committed_units(stage):
        return
    lake.write_named("generation_design", pa.Table.from_pandas(design_frame(job.rows), preserve_index=False),
                     config=config, part=unit, partition={"run": config.run})
    lake.commit_unit(stage, unit, {"rows": len(job.rows)})


# ---------------------------------------------------------------------------------------------- run
def run(lake, config: VaeReconConfig | None = None, max_blocks: int | None = None) -> dict:
    """Reconstruct the selected real crops into ``synthetic/<config.run>/``; resumable. Returns summary counts:
    ``{"run", "vae_id", "sites", "images", "crops_from_cache", "crops_encoded_now", "blocks", "blocks_done_now",
    "blocks_skipped", "seconds"}``."""
    from pipelines import generate

    config = config or PRESETS["demo"]
    check_name(config.run, "run")
    t0 = time.perf_counter()
    job, plates = plan(lake, config)
    record = check_run_config(lake, job, config, plates)
    write_design(lake, job, config)
    generate.prepare_images_array(lake, job.gen)
    stage = generate.block_stage(config.run)
    done = lake.committed_units(stage)
    n_blocks = job.gen.spec.n_blocks
    pending = [b for b in range(n_blocks) if generate.block_unit(b) not in done]
    if max_blocks is not None:
        pending = pending[:max_blocks]
    log.info("vae-recon %s: %d crops of %d sites (%d from the cache, %d encoded now) in %d blocks, %d to do",
             config.run, record["n_images"], record["n_sites"], record["crops_from_cache"],
             record["crops_encoded_now"], n_blocks, len(pending))

    def commit(result: dict) -> None:
        lake.commit_unit(stage, generate.block_unit(result["block"]),
                         {"images": result["images"], "seconds": result["seconds"]})

    if pending and config.actors == 0:
        worker = BlockReconstructor(lake, job)
        for block in pending:
            commit(worker(block))
    elif pending:
        _run_actors(lake, job, config, pending, commit)
    summary = {"run": config.run, "vae_id": job.vae_id, "sites": record["n_sites"], "images": record["n_images"],
               "crops_from_cache": record["crops_from_cache"], "crops_encoded_now": record["crops_encoded_now"],
               "blocks": n_blocks, "blocks_done_now": len(pending),
               "blocks_skipped": sum(generate.block_unit(b) in done for b in range(n_blocks)),
               "seconds": round(time.perf_counter() - t0, 2)}
    log.info("vae-recon: %s", summary)
    return summary


def _run_actors(lake, job: ReconJob, config: VaeReconConfig, pending: list[int], commit) -> None:
    """A pool of ``config.actors`` actors, two blocks queued per actor (bounded driver memory)."""
    from pipelines.ray_runtime import ensure_ray

    ray = ensure_ray()
    remote = ray.remote(num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor)(BlockReconstructor)
    actors = [remote.remote(lake, job) for _ in range(min(config.actors, len(pending)))]
    queue, in_flight = iter(pending), {}

    def submit(actor) -> None:
        block = next(queue, None)
        if block is not None:
            in_flight[actor.gen.remote(block)] = actor

    for actor in actors:
        submit(actor)
        submit(actor)
    try:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready[0])
            commit(ray.get(ready[0]))
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = sub.add_parser("vae-recon", help="real crops encoded and decoded by the VAE: the VAE's ceiling, profiled "
                                         "and evaluated like a generation run (resumable)",
                       description=__doc__.split("\n")[0])
    add_config_arguments(p, PRESETS, VaeReconConfig)
    p.add_argument("--run", type=lake_name, help=f"run name (default {RUN})")
    p.add_argument("--vae-id", help="latent cache latents/<vae_id>/ (default: the lake's only one)")
    p.add_argument("--sites", choices=("evaluated", "all"),
                   help="evaluated: the real arm's evaluated wells (default); all: every catalogued site")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from pipelines.cli import config_from_args, lake_from_args

    extra = [f"{k}={v}" for k, v in (("run", args.run), ("vae_id", args.vae_id), ("sites", args.sites)) if v]
    config = config_from_args(VaeReconConfig, PRESETS, args, extra)
    summary = run(lake_from_args(args), config)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0

