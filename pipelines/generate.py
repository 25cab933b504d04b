"""``cpldm generate``: mass generation with g-estimation, from a pool of model-holding Ray actors.

Recipe (METHOD.md "Generation"):

1. resolve the trained model through its ModelCard (``models/<model_run>/_artifact.json``), its confounder
   support (``confounder_support``, recorded by ``cpldm train``), and through the LatentCache record of its VAE
   id the VAE, channel groups and normalisation; write the run's GenerationRun record (docs/architecture.md);
2. select compounds (``seen|unseen|all|FILE``; DMSO added), reject those without an embedding (``rejects``);
3. write the design table ``generation_design`` (partition ``run=<gen_run>``) streamed in parts, each committed;
4. create ``synthetic/<gen_run>/images.zarr`` (N_rows, 5, H, W) uint16, one chunk per image, one shard per block;
5. ``actors`` :class:`BlockGenerator` actors (each loads U-Net + VAE once) stream over the uncommitted design
   blocks: sample latents (DDIM / DPM-Solver++) -> decode 8 latent channels to 5 image channels -> de-normalise
   to uint16 -> write the block's rows and its ``synthetic_manifest`` part (+ TIFFs); the driver then commits
   the block's marker.

``--oracle c-aware|scm-free`` replaces the model by the simulator (:class:`OracleRenderer` actors): each design
row is rendered by ``cpldm_core.simulate.oracle.render_condition`` (a perfect p(O | T, C), fresh cells from the
row's seed), put through ingest's transform (normalise, crop) and stored like a decoded model image. The support
then comes from the catalog and the split tables (:func:`cpldm_core.design.confounder_support`). ``--run truth``
with ``--oracle c-aware`` is the interventional truth (docs/generate.md).

Exactly-once: a block's outputs live at keys only that block writes (its image rows, its shard, its manifest
part), so a killed run rerun with the same settings redoes the uncommitted blocks and overwrites their partial
output; every row's noise comes from its own seed, so redone blocks are bit-identical.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import storage_schemas
from cpldm_core.configuration import load_config
from cpldm_core.design import GENERATE_PRESETS, ConfounderSpace, DesignSpec, GenerateConfig, generate_preset
from cpldm_core.errors import UserError
from storage_schemas import columns as cols
from storage_schemas.artifacts import (ArtifactMissing, GenerationRun, InputRef, LatentCache, ModelCard, fingerprint_of,
                                       read_artifact, read_record, write_record)
from storage_schemas.zarr_layouts import SYNTHETIC_IMAGES

log = logging.getLogger(__name__)

STAGE = "generate"
IMAGES_ARRAY = SYNTHETIC_IMAGES.array
#: Spatial compression of the SD/SDXL VAE family (4 levels -> 2^3); an image side is 8 x the latent side.
VAE_DOWNSAMPLE = 8


# ---------------------------------------------------------------------------------------------- paths
def run_dir(gen_run: str) -> str:
    return f"synthetic/{gen_run}"


def images_path(gen_run: str) -> str:
    return SYNTHETIC_IMAGES.path.format(run=gen_run)


def design_stage(gen_run: str) -> str:
    return f"{STAGE}-design-{gen_run}"


def block_stage(gen_run: str) -> str:
    return f"{STAGE}-{gen_run}"


def block_unit(block: int) -> str:
    return f"block-{block:06d}"


def model_rel(model_run: str) -> str:
    return f"models/{model_run}/final"


# ---------------------------------------------------------------------------------------------- model lookup
@dataclass(frozen=True)
class ModelInfo:
    """What generation needs to know about a trained run (from its ModelCard, :func:`resolve_model`)."""

    model_run: str
    rel_dir: str              # lake-relative model directory
    kind: str                 # scm | scm-free
    vocab: dict               # ConfounderVocab.to_dict()
    metadata: dict
    latent_shape: tuple[int, int, int]
    compound_input: str


def resolve_model(lake, model_run: str) -> ModelInfo:
    """A trained model through its ModelCard (``models/<run>/_artifact.json``, written by ``cpldm train``): kind,
    vocabulary, latent shape, schedule, VAE and encoder ids in one read; the weights in ``models/<run>/final/``.
    A model without a card (or with an older one) is a one-line error naming ``cpldm train --run <run>``."""
    try:
        card = read_artifact(lake, ModelCard, model_run)
    except ArtifactMissing as exc:
        raise UserError(f"no trained model '{model_run}' in {lake.uri} ({exc}); or pass --model-run") from None
    rel = model_rel(model_run)
    if not lake.exists(f"{rel}/weights.pt"):
        raise UserError(f"{lake.uri_of(rel)} holds no exported model (weights.pt); finish the run with "
                        f"`cpldm train --run {model_run} --resume`")
    if card.model_kind == "scm" and not card.vocabulary.get("batches"):
        raise UserError(f"{lake.uri_of(f'models/{model_run}')}: the ModelCard has no confounder vocabulary: cannot "
                        "draw training batches and wells")
    vocab = {k: list(v) for k, v in card.vocabulary.items()}
    metadata = {"vae_id": card.vae_id, "encoder_id": card.encoder_id, "schedule": dict(card.schedule),
                "latent_shape": list(card.latent_shape)}
    return ModelInfo(model_run=model_run, rel_dir=rel, kind=card.model_kind, vocab=vocab, metadata=metadata,
                     latent_shape=tuple(int(v) for v in card.latent_shape), compound_input=card.compound_input)


def read_support(lake, model_run: str) -> pd.DataFrame:
    """The confounder support recorded with model ``model_run`` by ``cpldm train`` (table ``confounder_support``,
    partition ``model=<run>``): (source, batch, well) observed with treatments in its training rows."""
    from cpldm_core.design import SUPPORT_COLUMNS

    rel = f"{storage_schemas.table_spec('confounder_support').path}/model={model_run}"
    if not lake.exists(rel):
        raise UserError(f"model '{model_run}' has no recorded confounder support ({lake.uri_of(rel)}); it was "
                        f"trained by an older version: retrain it with `cpldm train --run {model_run}`")
    return lake.read_table(rel).to_pandas()[list(SUPPORT_COLUMNS)]


def confounder_space(lake, model: ModelInfo, kind: str = "joint") -> ConfounderSpace:
    """p'(C): uniform over the model's recorded support (``joint``) or its batches x wells (``independent``)."""
    space = ConfounderSpace.from_table(read_support(lake, model.model_run), kind)
    sources = set(model.vocab.get("sources") or [])
    extra = sorted({s for s, _ in space.batches} - sources) if sources else []
    if extra:
        raise UserError(f"the support of model '{model.model_run}' names source(s) {extra} it was not trained on")
    return space


def encoder_of(lake, model: ModelInfo) -> str:
    """The compound encoder the model was trained with (its ModelCard's ``encoder_id``; never guessed)."""
    enc = model.metadata.get("encoder_id")
    if not enc:
        raise UserError(f"the ModelCard of model '{model.model_run}' names no encoder_id; retrain it with "
                        f"`cpldm train --run {model.model_run}`")
    return str(enc)


def vae_source(lake, model: ModelInfo, override: str | None) -> dict:
    """Where the model's VAE is: ``{"vae_id", "location", "subfolder", "channel_groups"}``.

    Read from the LatentCache record of the model's ``vae_id`` (``latents/<vae_id>/_artifact.json``): the VAE
    ingest encoded with and its channel groups. ``location`` is ``lake:<rel dir>`` for a VAE in the lake, an
    absolute directory, or a hub id ``owner/name`` -- the only form :class:`BlockGenerator` may download.
    ``override`` (``--vae``) is resolved like ``cpldm ingest --vae`` (:func:`pipelines.ingest.resolve_vae`): a
    lake name must be in the lake (else one line listing the lake's VAEs), never a hub request.
    """
    from pipelines.ingest import resolve_vae

    vae_id = str(model.metadata.get("vae_id") or "")
    if not vae_id:
        raise UserError(f"the ModelCard of model '{model.model_run}' names no vae_id; retrain it with "
                        f"`cpldm train --run {model.model_run}`")
    cache = read_artifact(lake, LatentCache, vae_id)
    if override:
        source = resolve_vae(lake, override, None)
        location = f"lake:{source['path']}" if source["kind"] == "lake" else str(source["path"])
        subfolder = source["subfolder"]
    else:
        kind, _, path = cache.vae_location.partition(":")
        if kind not in ("lake", "local", "hub") or not path:
            raise UserError(f"{lake.uri_of(f'latents/{vae_id}/_artifact.json')}: vae_location "
                            f"{cache.vae_location!r} is not lake:|local:|hub:<where>; rerun `cpldm ingest`")
        location, subfolder = (cache.vae_location if kind == "lake" else path), cache.vae_subfolder
    return {"vae_id": vae_id, "location": location, "subfolder": subfolder,
            "channel_groups": [list(map(int, g)) for g in cache.channel_groups]}


# ---------------------------------------------------------------------------------------------- compounds
def read_compound_file(path: str) -> list[str]:
    """JCP2022 ids from a text file (one per line), CSV/TSV or Parquet with a ``Metadata_JCP2022`` column."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--compounds {path}: no such file (or use seen|unseen|all)")
    if p.suffix == ".parquet":
        frame = pd.read_parquet(p)
    elif p.suffix in (".csv", ".tsv", ".gz"):
        frame = pd.read_csv(p, sep="\t" if ".tsv" in p.name else ",")
    else:
        ids = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return ids
    if "Metadata_JCP2022" not in frame.columns:
        raise UserError(f"{path}: needs a Metadata_JCP2022 column (has {', '.join(map(str, frame.columns))})")
    return [str(x) for x in frame["Metadata_JCP2022"].dropna()]


def select_compounds(lake, config: GenerateConfig, encoder: str) -> tuple[list[str], list[dict]]:
    """(compounds to generate, rejects). Compounds lacking an embedding are rejected with the reason."""
    from pipelines.embed import read_embeddings_table

    choice = config.compounds
    if choice in ("seen", "unseen", "all"):
        split = lake.read_named("split_compounds").to_pandas()
        if choice != "all":
            split = split[split["Metadata_CompoundSplit"] == choice]
        wanted = split["Metadata_JCP2022"].astype(str).tolist()
    else:
        wanted = read_compound_file(choice)
    if config.include_negcon:
        wanted.append(cols.DMSO_JCP2022)
    wanted = sorted(set(wanted))
    have = set(read_embeddings_table(lake, encoder, columns=["Metadata_JCP2022"])
               .column("Metadata_JCP2022").to_pylist())
    rejects = [{"item": c, "reason": f"no embedding for encoder {encoder!r} (run `cpldm embed`)"}
               for c in wanted if c not in have]
    return [c for c in wanted if c in have], rejects


# ---------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class GenerationJob:
    """Everything an actor needs (picklable: strings, numbers and the design spec)."""

    gen_run: str
    spec: DesignSpec
    model: ModelInfo
    encoder: str
    vae_location: str
    vae_subfolder: str | None
    vae_id: str
    channel_groups: tuple
    normalisation: dict
    sampler: str
    steps: int
    guidance_scale: float
    batch_size: int
    device: str
    threads: int
    export_tiff: bool
    oracle: str = ""              # "" (a model run) | c-aware | scm-free
    crop: tuple = ()              # oracle: ingest's (crop_mode, crop_size, tile_grid)
    vae_source: dict | None = None  # oracle_vae: the cache's VAE (pipelines.ingest.resolve_vae form)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.oracle:
            return (len(cols.CHANNELS), int(self.crop[1]), int(self.crop[1]))
        _, h, w = self.model.latent_shape
        return (len(cols.CHANNELS), h * VAE_DOWNSAMPLE, w * VAE_DOWNSAMPLE)


class BlockGenerator:
    """Model-holding worker: loads U-Net and VAE once; ``gen(block)`` generates and writes one design block.

    Usable without Ray (unit tests call it directly); in a run it is a Ray actor.
    """

    def __init__(self, lake, job: GenerationJob):
        import torch

        from cpldm_core.autoencoder import ChannelGroupAutoencoder
        from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
        from cpldm_core.diffusion import make_scheduler
        from pipelines.embed import load_embeddings

        self.lake, self.job = lake, job
        torch.set_num_threads(max(1, job.threads))
        device = job.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        with lake.local_dir(job.model.rel_dir) as model_dir:
            self.model = ConfounderAwareDenoiser.from_pretrained(model_dir).to(self.device)
        self.vocab = ConfounderVocab.from_dict(job.model.vocab)
        schedule = self.model.metadata.get("schedule")
        self.scheduler = make_scheduler(job.sampler, schedule)
        from pipelines.ingest import HUB_ID   # only an explicit hub id may download (vae_source)
        in_lake = job.vae_location.startswith("lake:")
        with (lake.local_dir(job.vae_location[len("lake:"):]) if in_lake
              else contextlib.nullcontext(job.vae_location)) as vae_path:
            self.autoencoder = ChannelGroupAutoencoder.from_pretrained(
                vae_path, subfolder=job.vae_subfolder, groups=tuple(tuple(g) for g in job.channel_groups),
                local_files_only=not HUB_ID.fullmatch(job.vae_location))
        self.autoencoder.to(self.device)
        emb = load_embeddings(lake, job.encoder, ids=list(job.spec.compounds))
        self.compound_row = {c: i for i, c in enumerate(emb.ids)}
        if job.model.compound_input == "tokens":
            if emb.tokens is None:
                raise UserError(f"model '{job.model.model_run}' takes token embeddings but encoder "
                                f"{job.encoder!r} has none")
            self.compound = torch.from_numpy(np.asarray(emb.tokens, dtype=np.float32))
            self.compound_mask = torch.from_numpy(np.asarray(emb.mask, dtype=bool))
        else:
            self.compound = torch.from_numpy(emb.pooled)
            self.compound_mask = None
        self.images = None

    def _array(self):
        if self.images is None:
            import zarr
            self.images = zarr.open_array(self.lake.zarr_store(images_path(self.job.gen_run)), path=IMAGES_ARRAY,
                                          mode="r+")
        return self.images

    def generate(self, design: pd.DataFrame) -> np.ndarray:
        """Images of design rows: ``(B, 5, H, W) uint16`` (channels DNA, ER, RNA, AGP, Mito)."""
        import torch

        from cpldm_core.diffusion import sample
        from cpldm_core.images import denormalise

        job = self.job
        low, high = job.normalisation["low"], job.normalisation["high"]
        out = np.empty((len(design), *job.image_shape), dtype=np.uint16)
        for start in range(0, len(design), job.batch_size):
            part = design.iloc[start:start + job.batch_size]
            idx = torch.as_tensor([self.compound_row[c] for c in part["Metadata_JCP2022"]], dtype=torch.long)
            compound = self.compound[idx]
            mask = self.compound_mask[idx] if self.compound_mask is not None else None
            confounders = None
            if self.model.kind == "scm":
                confounders = self.vocab.encode(part["Metadata_Source"].tolist(), part["Metadata_Batch"].tolist(),
                                                part["Metadata_Well"].tolist())
            latents = sample(self.model, self.scheduler, job.steps, job.guidance_scale, compound, mask,
                             confounders, seeds=part["Metadata_Seed"].tolist(), latent_shape=job.model.latent_shape)
            with torch.no_grad():
                decoded = self.autoencoder.decode(latents).float().cpu().numpy()
            out[start:start + len(part)] = denormalise(decoded, low, high)
        return out

    def __call__(self, block: int) -> dict:
        """Generate design block ``block`` and write its image rows, manifest part and TIFFs (not the marker)."""
        t0 = time.perf_counter()
        job = self.job
        design = job.spec.block(block)
        images = self.generate(design)
        rows = job.spec.block_rows(block)
        # one assignment covering the block's whole shard: a single object write per shard on S3
        self._array()[rows.start:rows.stop] = images
        write_manifest(self.lake, job, block, design)
        if job.export_tiff:
            export_tiffs(self.lake, job, block, design, images)
        seconds = time.perf_counter() - t0
        return {"block": block, "images": len(design), "seconds": seconds}

    # Ray actors are called through a named method
    def gen(self, block: int) -> dict:
        return self(block)


class OracleRenderer(BlockGenerator):
    """Simulator-holding worker (``--oracle``): renders design rows with the world's causal model.

    Each row: ``render_condition(world, compound, source, batch, well, default_rng(seed))`` -> the site at the
    world's field size, then exactly ingest's transform of a real site (global per-channel normalisation to
    [-1, 1], the ingest crop) and :func:`cpldm_core.images.denormalise` back to uint16, which is the
    representation a model's decoded images are stored in. With ``--oracle-vae`` the normalised crops first go
    through the cache's VAE as ingest and a model's decoder would (encode to float16 latents, decode). Usable
    without Ray.
    """

    def __init__(self, lake, job: GenerationJob):  # noqa: D107 (no model to load: the world, and maybe the VAE)
        from pipelines.simulate import load_world

        self.lake, self.job = lake, job
        self.world = load_world(lake)
        self.images = None
        self.autoencoder = None
        if job.vae_source is not None:
            import torch

            from pipelines.ingest import load_autoencoder

            torch.set_num_threads(max(1, job.threads))
            self.autoencoder = load_autoencoder(lake, job.vae_source, job.channel_groups)

    def generate(self, design: pd.DataFrame) -> np.ndarray:
        """Images of design rows: ``(B, 5, H, W) uint16``, H = W = the ingest crop size."""
        from cpldm_core.images import denormalise

        if not len(design):
            return np.zeros((0, *self.job.image_shape), np.uint16)
        norm = self.job.normalisation
        crops = np.stack([oracle_crop(self.world, row.Metadata_JCP2022, row.Metadata_Source, row.Metadata_Batch,
                                      row.Metadata_Well, int(row.Metadata_Seed), norm, self.job.crop)
                          for row in design.itertuples(index=False)])
        if self.autoencoder is None:
            return denormalise(crops, norm["low"], norm["high"])
        import torch

        from pipelines.vae_recon import decode_stored

        batch = self.job.batch_size
        latents = np.concatenate([self.autoencoder.encode_cached(torch.from_numpy(crops[i:i + batch]))
                                  for i in range(0, len(crops), batch)])
        return decode_stored(self.autoencoder, latents, norm, batch)


def oracle_crop(world, compound: str, source: str, batch: str, well: str, seed: int, normalisation: dict,
                crop: tuple) -> np.ndarray:
    """One oracle crop ``(5, S, S) float32`` in [-1, 1]: the simulator's site for (compound, confounders) with
    fresh cells from ``seed``, normalised and cropped as ingest does a real site (``crop = (mode, size, grid)``;
    tile mode keeps tile ``seed % tiles``)."""
    from cpldm_core import images as im
    from cpldm_core.simulate.oracle import render_condition

    raw = render_condition(world, compound, source, batch, well, np.random.default_rng(int(seed)))
    mode, size, grid = crop
    crops = im.crops_of(im.normalise(raw, normalisation["low"], normalisation["high"]), mode, int(size), int(grid))
    return crops[int(seed) % len(crops)]


def oracle_image(world, compound: str, source: str, batch: str, well: str, seed: int, normalisation: dict,
                 crop: tuple) -> np.ndarray:
    """One oracle image ``(5, S, S) uint16``: :func:`oracle_crop` stored as
    :func:`~cpldm_core.images.denormalise` stores decoded images."""
    from cpldm_core import images as im

    return im.denormalise(oracle_crop(world, compound, source, batch, well, seed, normalisation, crop),
                          normalisation["low"], normalisation["high"])


def write_manifest(lake, job: GenerationJob, block: int, design: pd.DataFrame) -> None:
    n = len(design)
    manifest = design.assign(
        Metadata_ImageRow=design["Metadata_DesignRow"].astype("int64"),
        Metadata_Model=job.model.model_run, Metadata_ModelKind=job.model.kind, Metadata_Sampler=job.sampler,
        Metadata_SamplerSteps=np.full(n, job.steps, dtype=np.int32),
        Metadata_GuidanceScale=np.full(n, job.guidance_scale, dtype=np.float32))
    lake.write_named("synthetic_manifest", pa.Table.from_pandas(manifest, preserve_index=False),
                     part=block_unit(block), partition={"run": job.gen_run})


def tiff_name(well: str, site: int, channel: int) -> str:
    """JUMP (Phenix) file name ``rXXcYYfZZp01-chNsk1fk1fl1.tiff`` for a well such as ``B03``."""
    from cpldm_core.denoiser import split_well

    row, col = split_well(well)
    row_number = 0
    for ch in row:   # A=1 ... Z=26, AA=27 (1536-well plates)
        row_number = row_number * 26 + (ord(ch) - ord("A") + 1)
    return f"r{row_number:02d}c{col:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff"


def _tiff_site(job: GenerationJob, row) -> int:
    # a treatment has one image per draw; DMSO has dmso_per_draw of them: number them all apart
    if row.Metadata_JCP2022 == job.spec.negcon:
        return row.Metadata_Draw * job.spec.dmso_per_draw + row.Metadata_Replicate + 1
    return row.Metadata_Draw + 1


def export_tiffs(lake, job: GenerationJob, block: int, design: pd.DataFrame, images: np.ndarray) -> None:
    """JUMP layout: ``synthetic/<run>/tiff/<source>/images/<batch>/images/<plate>/Images/<file>`` with plate =
    the compound id and site = draw + 1 (DMSO: draw x dmso_per_draw + replicate + 1) so every image has a
    unique path, chN = CHANNELS order + 1; plus a
    load_data CSV per block (``tiff/load_data_csv/block-XXXXXX.csv``, JUMP's ``URL_Orig*`` columns)."""
    import tifffile

    base = f"{run_dir(job.gen_run)}/tiff"
    records = []
    for k, row in enumerate(design.itertuples(index=False)):
        plate = row.Metadata_JCP2022
        folder = f"{base}/{row.Metadata_Source}/images/{row.Metadata_Batch}/images/{plate}/Images"
        urls = {}
        for c, name in enumerate(cols.CHANNELS):
            rel = f"{folder}/{tiff_name(row.Metadata_Well, _tiff_site(job, row), c + 1)}"
            buf = io.BytesIO()
            tifffile.imwrite(buf, images[k, c])
            lake.write_bytes(rel, buf.getvalue())
            urls[f"URL_Orig{name}"] = lake.uri_of(rel)
        records.append({**urls, "Metadata_Source": row.Metadata_Source, "Metadata_Batch": row.Metadata_Batch,
                        "Metadata_Plate": plate, "Metadata_Well": row.Metadata_Well,
                        "Metadata_Site": _tiff_site(job, row), "Metadata_JCP2022": row.Metadata_JCP2022,
                        "Metadata_Draw": row.Metadata_Draw, "Metadata_ImageRow": row.Metadata_DesignRow})
    lake.write_bytes(f"{base}/load_data_csv/{block_unit(block)}.csv",
                     pd.DataFrame.from_records(records).to_csv(index=False).encode())


# ---------------------------------------------------------------------------------------------- driver steps
def check_run_config(lake, job: GenerationJob, config: GenerateConfig) -> dict:
    """Write ``synthetic/<run>/config.json`` or refuse to resume a run made with different settings."""
    record = {
        "run": job.gen_run, "model_run": job.model.model_run, "model_kind": job.model.kind,
        "draws": job.spec.draws, "sampler": job.sampler, "steps": job.steps, "guidance_scale": job.guidance_scale,
        "compounds": config.compounds, "n_compounds": len(job.spec.compounds), "n_images": job.spec.n_rows,
        "design": job.spec.kind, "support": job.spec.space.kind, "support_combinations":
            len(job.spec.space.combinations), "support_values": len(job.spec.space.values),
        "shared_draws": job.spec.shared_draws, "dmso_per_draw": job.spec.dmso_per_draw,
        "plates": "one per draw (Metadata_Plate = draw-<i:04d>), normalised against its own DMSO images",
        "seed_namespace": job.spec.namespace, "oracle": job.oracle or None,
        "oracle_vae": job.vae_source is not None,
        "block_size": job.spec.block_size, "image_shape": list(job.image_shape), "encoder": job.encoder,
        "vae": job.vae_location, "vae_id": job.vae_id, "normalisation": job.normalisation,
        "design_fingerprint": job.spec.fingerprint(),
    }
    if job.oracle:
        record["crop"] = list(job.crop)
    planned = generation_record(lake, job, config)
    write_or_refuse_run(lake, job.gen_run, config, record, planned,
                        keys=("model_run", "design_fingerprint", "sampler", "steps", "guidance_scale", "image_shape",
                              "vae", "oracle", "oracle_vae"))
    return record


def write_or_refuse_run(lake, gen_run: str, config, record: dict, planned: GenerationRun,
                        keys: tuple[str, ...]) -> None:
    """The resume rule of a ``synthetic/<run>/`` directory (generate and vae-recon): refuse, in one line naming
    the fields, when its stored GenerationRun's science fingerprint differs from ``planned`` or its
    ``config.json`` differs from ``record`` on ``keys`` (the config check covers a run that predates the
    record); else write both."""
    changed: list[str] = []
    if lake.exists(f"{run_dir(gen_run)}/_artifact.json"):
        stored = read_record(lake, run_dir(gen_run), GenerationRun, gen_run)
        if stored.fingerprint != planned.fingerprint:
            changed += planned.changed_fields(stored)
    rel = f"{run_dir(gen_run)}/config.json"
    if lake.exists(rel):
        old = lake.read_json(rel).get("generation", {})
        changed += [k for k in keys if old.get(k) != record[k] and k not in changed]
    if changed:
        raise UserError(f"generation run '{gen_run}' already exists in {lake.uri} with different "
                        f"{', '.join(changed)}; choose another --run, or delete {lake.uri_of(run_dir(gen_run))}")
    lake.write_config(run_dir(gen_run), config, extra={"generation": record})
    write_record(lake, run_dir(gen_run), planned)


#: GenerateConfig fields that only choose resources or output formats: a run may resume with others.
RESOURCE_KEYS = ("run", "batch_size", "design_part_rows", "actors", "cpus_per_actor", "gpus_per_actor",
                 "max_in_flight_per_actor", "export_tiff", "device")


def generation_record(lake, job: GenerationJob, config: GenerateConfig) -> GenerationRun:
    """The GenerationRun record of ``job``. Inputs: ``model`` (its ModelCard) or ``oracle`` (the simulator, with
    the catalog fingerprint of the sites it renders from), and ``latents`` (the LatentCache whose normalisation
    and crop the images follow)."""
    from cpldm_core.configuration import config_to_dict
    from pipelines.storage import code_version

    settings = config_to_dict(config)
    inputs = {"latents": read_artifact(lake, LatentCache, job.vae_id).ref()}
    if job.oracle:
        sites = oracle_inputs(lake)[0]
        inputs["oracle"] = InputRef(kind="Oracle", id=job.oracle, fingerprint=fingerprint_of(
            {"oracle": job.oracle, "sites": sites.astype(str).values.tolist()}))
    else:
        inputs["model"] = read_artifact(lake, ModelCard, job.model.model_run).ref()
    science = {k: v for k, v in settings.items() if k not in RESOURCE_KEYS}
    return GenerationRun(
        id=job.gen_run, inputs=inputs, config={**science, "design_fingerprint": job.spec.fingerprint(),
                                               "image_shape": list(job.image_shape)},
        resources={k: settings[k] for k in RESOURCE_KEYS if k in settings}, code_version=code_version(),
        model_run="" if job.oracle else job.model.model_run, design=job.spec.kind, draws=job.spec.draws,
        compounds=config.compounds, guidance_scale=float(job.guidance_scale), sampler=job.sampler,
        sampler_steps=int(job.steps), seed_namespace=job.spec.namespace, oracle=job.oracle or None,
        rows=int(job.spec.n_rows))


def read_generation_run(lake, gen_run: str) -> GenerationRun:
    """The GenerationRun record of ``synthetic/<gen_run>/`` (one-line error naming `cpldm generate`)."""
    return read_artifact(lake, GenerationRun, gen_run)


def write_design(lake, spec: DesignSpec, gen_run: str, part_rows: int, config: GenerateConfig) -> int:
    """Stream the design table in parts (each committed); returns the number of parts written now."""
    stage = design_stage(gen_run)
    done = lake.committed_units(stage)
    written = 0
    per_part = max(1, part_rows // spec.block_size)
    for p, frame in spec.iter_parts(part_rows):
        unit = f"part-{p * per_part:06d}"
        if unit in done:
            continue
        lake.write_named("generation_design", pa.Table.from_pandas(frame, preserve_index=False), config=config,
                         part=unit, partition={"run": gen_run})
        lake.commit_unit(stage, unit, {"rows": len(frame)})
        written += 1
    return written


def prepare_images_array(lake, job: GenerationJob) -> None:
    """Create ``images.zarr/images`` (N, 5, H, W) uint16, chunk = 1 image, shard = 1 block (or check it)."""
    import zarr

    shape = (job.spec.n_rows, *job.image_shape)
    store = lake.zarr_store(images_path(job.gen_run))
    try:
        existing = zarr.open_array(store, path=IMAGES_ARRAY, mode="r")
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, KeyError, ValueError):
        existing = None
    except Exception as exc:  # zarr raises NodeNotFoundError in newer versions
        if "not found" not in str(exc).lower() and "NotFound" not in type(exc).__name__:
            raise
        existing = None
    if existing is not None:
        if tuple(existing.shape) != shape or existing.dtype != np.uint16:
            raise UserError(f"{lake.uri_of(images_path(job.gen_run))} holds {existing.shape} {existing.dtype}, "
                            f"this run needs {shape} uint16; choose another --run")
        return
    group = zarr.open_group(store, mode="a")
    group.attrs.update({"run": job.gen_run, "model_run": job.model.model_run, "channels": list(cols.CHANNELS),
                        "normalisation": job.normalisation})
    arr = group.create_array(IMAGES_ARRAY, shape=shape, dtype="uint16", chunks=(1, *job.image_shape),
                             shards=(job.spec.block_size, *job.image_shape), fill_value=0,
                             dimension_names=("row", "channel", "y", "x"))
    arr.attrs.update({"run": job.gen_run, "model_run": job.model.model_run, "model_kind": job.model.kind,
                      "channels": list(cols.CHANNELS), "normalisation": job.normalisation,
                      "config": {"sampler": job.sampler, "steps": job.steps, "guidance_scale": job.guidance_scale,
                                 "draws": job.spec.draws, "design": job.spec.kind}})


def plan(lake, config: GenerateConfig) -> tuple[GenerationJob, list[dict]]:
    """Resolve model, confounder space, compounds and design: the job and the compound rejects."""
    if config.oracle:
        return plan_oracle(lake, config)
    model = resolve_model(lake, config.model_run)
    space = confounder_space(lake, model, config.support)
    encoder = encoder_of(lake, model)
    compounds, rejects = select_compounds(lake, config, encoder)
    if not compounds:
        raise UserError(f"no compound to generate: selection '{config.compounds}' matched none with an embedding "
                        f"for encoder {encoder!r}")
    spec = DesignSpec(config.namespace, tuple(compounds), config.draws, space, kind=config.design,
                      shared_draws=config.shared_draws, block_size=config.block_size,
                      dmso_per_draw=config.dmso_per_draw, negcon=cols.DMSO_JCP2022)
    vae = vae_source(lake, model, config.vae)
    from pipelines.ingest import read_normalisation
    norm = read_normalisation(lake, vae["vae_id"]).to_dict()
    job = GenerationJob(gen_run=config.run_name, spec=spec, model=model, encoder=encoder,
                        vae_location=vae["location"], vae_subfolder=vae["subfolder"], vae_id=vae["vae_id"],
                        channel_groups=tuple(tuple(g) for g in vae["channel_groups"]), normalisation=norm,
                        sampler=config.sampler,
                        steps=config.steps, guidance_scale=config.guidance_scale, batch_size=config.batch_size,
                        device=config.device if config.gpus_per_actor > 0 or config.device != "auto" else "cpu",
                        threads=max(1, int(config.cpus_per_actor)), export_tiff=config.export_tiff)
    return job, rejects


def oracle_inputs(lake) -> tuple[pd.DataFrame, set[str], set[str]]:
    """(catalog sites [source, batch, well, compound], training batches, seen compounds) of the lake."""
    sites = lake.read_named("sites", columns=["Metadata_Source", "Metadata_Batch", "Metadata_Well",
                                              "Metadata_JCP2022"]).to_pandas()
    split_b = lake.read_named("split_batches").to_pandas()
    split_c = lake.read_named("split_compounds").to_pandas()
    train = set(split_b.loc[split_b["Metadata_BatchSplit"] == "train", "Metadata_Batch"].astype(str))
    seen = set(split_c.loc[split_c["Metadata_CompoundSplit"] == "seen", "Metadata_JCP2022"].astype(str))
    return sites, train, seen


def plan_oracle(lake, config: GenerateConfig) -> tuple[GenerationJob, list[dict]]:
    """The job of an oracle run: support and p(C | T) from the catalog and split tables, image size and
    normalisation from the lake's (only, or ``--vae``) latent cache, no model and no embeddings."""
    from cpldm_core.design import compound_supports, confounder_support

    sites, train, seen = oracle_inputs(lake)
    # the same rows a model trains on: seen compounds in training batches
    space = ConfounderSpace.from_table(confounder_support(sites, train, compounds=seen), config.support)
    if config.compounds in ("seen", "unseen", "all"):
        split = lake.read_named("split_compounds").to_pandas()
        if config.compounds != "all":
            split = split[split["Metadata_CompoundSplit"] == config.compounds]
        wanted = set(split["Metadata_JCP2022"].astype(str))
    else:
        wanted = set(read_compound_file(config.compounds))
    if config.include_negcon:
        wanted.add(cols.DMSO_JCP2022)
    plated = set(sites["Metadata_JCP2022"].astype(str))
    rejects = [{"item": c, "reason": "not in the catalog's sites: the simulator has no such compound"}
               for c in sorted(wanted - plated)]
    compounds = sorted(wanted & plated)
    if not compounds:
        raise UserError(f"no compound to render: selection '{config.compounds}' matched none in the catalog")
    per_compound = ()
    if config.oracle == "scm-free":
        observed = compound_supports(sites, train, seen, compounds)
        per_compound = tuple((c, ConfounderSpace.from_table(observed[c], "joint")) for c in compounds)
    spec = DesignSpec(config.namespace, tuple(compounds), config.draws, space, kind=config.design,
                      shared_draws=config.shared_draws, block_size=config.block_size,
                      dmso_per_draw=config.dmso_per_draw, negcon=cols.DMSO_JCP2022, compound_spaces=per_compound)
    vae_id = config.vae or _only_latent_cache(lake)
    from pipelines.ingest import read_normalisation
    norm = read_normalisation(lake, vae_id).to_dict()
    cache = read_artifact(lake, LatentCache, vae_id)   # the oracle renders images the size of the real crops
    crop = (cache.crop_mode, int(cache.crop_size), int(cache.tile_grid))
    kind = f"oracle-{config.oracle}"
    model = ModelInfo(model_run=kind, rel_dir="", kind=kind, vocab={}, metadata={}, latent_shape=(0, 0, 0),
                      compound_input="")
    vae: dict = {"vae_location": "", "vae_subfolder": None, "channel_groups": ()}
    if config.oracle_vae:   # through the VAE that made the cache, as a model trained on it would decode
        from pipelines.ingest import recorded_vae_source
        vae = {"vae_location": cache.vae_location, "vae_subfolder": cache.vae_subfolder,
               "channel_groups": tuple(tuple(g) for g in cache.channel_groups),
               "vae_source": recorded_vae_source(lake, vae_id)[0]}
    job = GenerationJob(gen_run=config.run_name, spec=spec, model=model, encoder="", vae_id=vae_id,
                        normalisation=norm, sampler="simulator", steps=0, guidance_scale=1.0,
                        batch_size=config.batch_size, device="cpu", threads=max(1, int(config.cpus_per_actor)),
                        export_tiff=config.export_tiff, oracle=config.oracle, crop=crop, **vae)
    return job, rejects


def _only_latent_cache(lake) -> str:
    found = [posixpath.basename(p) for p in lake.ls("latents") if lake.exists(f"{p}/normalisation.json")]
    if len(found) != 1:
        raise UserError(f"latents/ holds {found or 'no'} latent cache(s); the oracle needs the ingest normalisation "
                        "and crop of one: run `cpldm ingest` or pass --vae <vae_id>")
    return found[0]


def run(lake, config: GenerateConfig | None = None, max_blocks: int | None = None, use_ray: bool = True) -> dict:
    """Generate ``config.run_name``; resumable. Returns summary counts.

    Args:
        lake: :class:`pipelines.storage.Lake`.
        config: :class:`GenerateConfig` (default: the ``demo`` preset).
        max_blocks: generate at most this many pending blocks, then stop (partial runs, tests).
        use_ray: ``False`` runs one in-process generator (debugging, profiling); outputs are identical.
    Returns:
        ``{"run", "model_run", "model_kind", "compounds", "draws", "images", "blocks", "blocks_done_now",
        "blocks_skipped" (already committed), "blocks_busy" (claimed by another live run of the same ``--run``),
        "rejected_compounds", "images_generated_now", "seconds", "images_per_s"}``.
    """
    config = config or generate_preset("demo")
    t0 = time.perf_counter()
    job, rejects = plan(lake, config)
    gen_run = job.gen_run
    check_run_config(lake, job, config)
    if rejects:
        frame = pd.DataFrame([{"unit": "compounds", **r} for r in rejects])
        lake.write_named("rejects", pa.Table.from_pandas(frame, preserve_index=False), part=f"{gen_run}-compounds",
                         partition={"stage": STAGE})
        log.warning("generate %s: %d compound(s) rejected (see the rejects table), e.g. %s", gen_run,
                    len(rejects), rejects[0])
    parts = write_design(lake, job.spec, gen_run, config.design_part_rows, config)
    log.info("generate %s: design of %d compounds x %d draws = %d images in %d blocks (%d design parts written)",
             gen_run, len(job.spec.compounds), job.spec.draws, job.spec.n_rows, job.spec.n_blocks, parts)
    prepare_images_array(lake, job)
    stage = block_stage(gen_run)
    done = lake.committed_units(stage)
    pending = [b for b in range(job.spec.n_blocks) if block_unit(b) not in done][:max_blocks]
    busy: list[str] = []
    started: list[int] = []

    def claimed():
        """Pending blocks, each claimed just before it starts: a second run of the same ``--run`` takes the
        blocks this one has not started, and leaves those a live run holds (``busy``)."""
        by_unit = {block_unit(b): b for b in pending}
        for unit in lake.claim_units(stage, list(by_unit), busy):
            started.append(by_unit[unit])
            yield by_unit[unit]

    results = []
    try:
        if pending:
            results = (_run_actors(lake, job, config, claimed(), len(pending)) if use_ray
                       else _run_local(lake, job, claimed(), len(pending)))
    finally:
        for block in started:  # committed or not: a rerun (or another run) may take what this one left
            lake.release_unit(stage, block_unit(block))
    if busy:
        log.warning("generate %s: %d block(s) claimed by another live run were left to it", gen_run, len(busy))
    generated = sum(r["images"] for r in results)
    seconds = time.perf_counter() - t0
    summary = {"run": gen_run, "model_run": job.model.model_run, "model_kind": job.model.kind,
               "oracle": job.oracle or None, "guidance_scale": job.guidance_scale,
               "compounds": len(job.spec.compounds), "draws": job.spec.draws, "images": job.spec.n_rows,
               "blocks": job.spec.n_blocks, "blocks_done_now": len(results),
               "blocks_skipped": sum(block_unit(b) in done for b in range(job.spec.n_blocks)),
               "blocks_busy": len(busy),
               "rejected_compounds": len(rejects), "images_generated_now": generated,
               "seconds": round(seconds, 2), "images_per_s": round(generated / seconds, 3) if seconds else 0.0}
    log.info("generate %s: %s", gen_run, summary)
    return summary


def _commit(lake, job: GenerationJob, result: dict, n_done: int, n_total: int) -> None:
    lake.commit_unit(block_stage(job.gen_run), block_unit(result["block"]),
                     {"images": result["images"], "seconds": result["seconds"]})
    lake.release_unit(block_stage(job.gen_run), block_unit(result["block"]))  # another run now sees it committed
    log.info("generate %s: block %d committed (%d images, %.2f images/s) [%d/%d]", job.gen_run, result["block"],
             result["images"], result["images"] / max(result["seconds"], 1e-9), n_done, n_total)


def _worker_class(job: GenerationJob) -> type:
    return OracleRenderer if job.oracle else BlockGenerator


def _run_local(lake, job: GenerationJob, blocks: Iterator[int], total: int) -> list[dict]:
    """Generate ``blocks`` (at most ``total``) in this process, committing each."""
    first = next(blocks, None)
    if first is None:  # every pending block is another run's: load no model
        return []
    generator = _worker_class(job)(lake, job)
    results = []
    for block in chain([first], blocks):
        results.append(generator(block))
        _commit(lake, job, results[-1], len(results), total)
    return results


def _run_actors(lake, job: GenerationJob, config: GenerateConfig, blocks: Iterator[int], total: int) -> list[dict]:
    """A pool of ``config.actors`` actors; at most ``max_in_flight_per_actor`` blocks queued per actor, so driver
    and object-store memory stay bounded whatever the number of blocks. ``blocks`` yields at most ``total``."""
    from pipelines.ray_runtime import ensure_ray

    first = next(blocks, None)
    if first is None:  # every pending block is another run's: start no actor
        return []
    ray = ensure_ray()
    remote = ray.remote(num_cpus=config.cpus_per_actor,
                        num_gpus=0 if job.oracle else config.gpus_per_actor)(_worker_class(job))
    n_actors = min(config.actors, total)
    actors = [remote.remote(lake, job) for _ in range(n_actors)]
    queue = chain([first], blocks)
    in_flight: dict = {}

    def submit(actor) -> bool:
        block = next(queue, None)
        if block is None:
            return False
        in_flight[actor.gen.remote(block)] = actor
        return True

    for actor in actors:
        for _ in range(config.max_in_flight_per_actor):
            submit(actor)
    results = []
    try:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready[0])
            result = ray.get(ready[0])
            results.append(result)
            _commit(lake, job, result, len(results), total)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results


# ---------------------------------------------------------------------------------------------- reading back
def read_manifest(lake, gen_run: str) -> pd.DataFrame:
    """Manifest rows of a generation run's committed blocks, sorted by image row."""
    done = lake.committed_units(block_stage(gen_run))
    base = f"synthetic_manifest/run={gen_run}"
    frames = [lake.read_table(f"{base}/{u}.parquet").to_pandas() for u in sorted(done)
              if lake.exists(f"{base}/{u}.parquet")]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values("Metadata_ImageRow").reset_index(drop=True)


def open_images(lake, gen_run: str):
    """The run's ``images`` zarr array (N, 5, H, W) uint16, read-only."""
    import zarr
    return zarr.open_array(lake.zarr_store(images_path(gen_run), read_only=True), path=IMAGES_ARRAY, mode="r")


# ---------------------------------------------------------------------------------------------- CLI
def load_generate_config(config_file: str | None = None, overrides: list[str] | dict | None = None,
                         preset: str = "demo") -> GenerateConfig:
    return load_config(GenerateConfig, config_file, overrides, base=generate_preset(preset))


def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = subparsers.add_parser("generate", help="g-estimation: generate synthetic images from a trained model",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, GENERATE_PRESETS, GenerateConfig)
    p.add_argument("--model-run", type=lake_name, help="trained model run under models/ (scm, scm-free, ...)")
    p.add_argument("--draws", type=int, help="N draws per compound (paper: 10, 100)")
    p.add_argument("--compounds", help="seen | unseen | all | FILE of JCP2022 ids")
    p.add_argument("--sampler", choices=("ddim", "dpm++"))
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", "--guidance", dest="guidance", type=float,
                   help="classifier-free guidance on the compound (null compound token), >= 0; 1 = none")
    p.add_argument("--run", type=lake_name, help="generation run name (default <model-run>-N<draws>[-g<scale>], "
                                 "oracle-<kind>-N<draws>); `--oracle c-aware --run truth` = the interventional truth")
    p.add_argument("--design", choices=("uniform", "stratified"))
    p.add_argument("--support", choices=("joint", "independent"),
                   help="p'(C): uniform over observed (source, batch, well) (joint, default) or observed batches x "
                        "observed treatment wells (independent)")
    p.add_argument("--per-compound-draws", dest="shared_draws", action="store_false", default=None,
                   help="draw noise and confounders per compound instead of one shared draw per repetition")
    p.add_argument("--dmso-per-draw", type=int, help="DMSO images per draw (its plate's controls; default 8)")
    p.add_argument("--oracle", choices=("c-aware", "scm-free"),
                   help="render with the simulator as a perfect generator instead of a model")
    p.add_argument("--oracle-vae", action="store_true", default=None,
                   help="with --oracle: pass each rendered crop through the latent cache's VAE (a perfect latent "
                        "generator: the ceiling of any model trained on that cache)")
    p.add_argument("--seed-namespace", help="hash namespace of seeds/confounders (default: the run name)")
    p.add_argument("--actors", type=int, help="model-holding Ray actors")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--export-tiff", action="store_true", default=None, help="also write TIFFs in the JUMP layout")
    p.add_argument("--vae", help="VAE path/model id (default: the model's)")
    p.set_defaults(func=_cli)


_FLAG_KEYS = {"model_run": "model_run", "draws": "draws", "compounds": "compounds", "sampler": "sampler",
              "steps": "steps", "guidance": "guidance_scale", "run": "run", "design": "design",
              "support": "support", "shared_draws": "shared_draws", "dmso_per_draw": "dmso_per_draw",
              "oracle": "oracle", "oracle_vae": "oracle_vae", "seed_namespace": "seed_namespace", "actors": "actors",
              "cpus_per_actor": "cpus_per_actor", "gpus_per_actor": "gpus_per_actor", "export_tiff": "export_tiff",
              "vae": "vae"}


def _cli(args: argparse.Namespace) -> int:
    from pipelines.cli import lake_from_args

    overrides: dict[str, Any] = {}
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    config = load_generate_config(args.config, list(args.set), preset=args.preset)
    config = load_config(GenerateConfig, None, overrides, base=config)
    summary = run(lake_from_args(args), config)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
