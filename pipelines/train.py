"""``cpldm train``: fit the confounder-aware latent diffusion model (or its SCM-free twin) with Ray Train.

Recipe (read top to bottom):
1. read ``latent_index`` (vae partition), the split tables and the compound embeddings; keep latents of *seen*
   compounds in *train* batches (held-out batches of seen compounds become the validation set; unseen compounds
   never reach a worker); rows lacking an embedding go to ``rejects``;
2. fit the confounder vocabularies on the training rows; write ``models/<run>/config.json`` + ``vocab.json``;
3. each worker streams its own samples through Ray Data: the sample stream is the concatenation of seeded
   per-epoch permutations of the training rows, and step ``k`` of rank ``r`` takes fixed positions of it
   (:func:`cpldm_core.diffusion.global_positions`); ``map_batches`` tasks map positions to rows and read the
   latents from the Zarr cache, in order (``preserve_order``). What a step trains on, and the noise it draws
   (a generator reseeded per step), depend only on the seed and the step: a rerun, or a run restored from a
   checkpoint after a failure, computes the same weights as an uninterrupted one;
4. a Ray Train ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU) runs :func:`train_loop_per_worker`: AdamW,
   v-prediction loss, optional EMA, bf16 autocast on GPU, gradient accumulation; every ``checkpoint_every``
   steps rank 0 writes the history since the last checkpoint and a checkpoint (model, optimiser, EMA, step);
   ``FailureConfig`` restarts a failed worker group from the last checkpoint;
5. rank 0 exports the final (EMA) model to ``models/<run>/final/``; the driver draws ``loss.png``.

A rerun of a finished or stopped run needs ``--resume`` (Ray Train then restores the latest checkpoint listed
in ``models/<run>/checkpoint_manager_snapshot.json``); history parts are keyed by their step range, so steps
redone after a restart overwrite, never duplicate.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cpldm_core.configuration import config_to_dict, load_config
from cpldm_core.diffusion import TRAIN_PRESETS, TrainConfig
from cpldm_core.errors import UserError
from storage_schemas import zarr_layouts
from storage_schemas.artifacts import InputRef, LatentCache, ModelCard, read_artifact, read_record, write_record

log = logging.getLogger(__name__)

STAGE = "train"
MODELS_DIR = "models"
CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"   # Ray Train V2's checkpoint index (ray.train.v2 constants)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: TrainConfig fields that do not change the weights a step computes: where and how fast it runs, how often it
#: checkpoints and validates, when it stops (``--resume`` may train a run longer) and test hooks. They are the
#: ModelCard's ``resources``; every other field is science (``workers`` too: it sets the effective batch), and a
#: resumed run whose science differs is refused. ``vae_id``/``encoder_id`` are the card's inputs instead.
RESOURCE_KEYS = ("cpus_per_worker", "data_cpus", "gpus_per_worker", "max_failures", "keep_checkpoints",
                 "checkpoint_every", "val_every", "val_max_rows", "val_timesteps", "max_steps", "epochs",
                 "fail_at_step", "audit_rows")
#: Confounder columns an scm model conditions on (the ConfounderVocab's source, batch and well tokens).
SCM_CONFOUNDERS = ("Metadata_Source", "Metadata_Batch", "Metadata_Well")


# ---------------------------------------------------------------------------------------------- lake layout
def run_dir(run: str) -> str:
    return f"{MODELS_DIR}/{run}"


def final_dir(run: str) -> str:
    """Lake-relative directory of the exported model (``ConfounderAwareDenoiser.save_pretrained`` files)."""
    return f"{run_dir(run)}/final"


def latents_rel(vae_id: str) -> str:
    return zarr_layouts.LATENTS.path.format(vae_id=vae_id)


def _partitions(lake, base: str, key: str) -> list[str]:
    return sorted(posixpath.basename(p).split("=", 1)[1] for p in lake.ls(base)
                  if posixpath.basename(p).startswith(f"{key}="))


def _pick(lake, given: str, base: str, key: str, what: str) -> str:
    found = _partitions(lake, base, key)
    if given:
        if given not in found:
            raise UserError(f"no {what} {given!r} in {lake.uri_of(base)} (found: {', '.join(found) or 'none'})")
        return given
    if len(found) != 1:
        raise UserError(f"{lake.uri_of(base)} holds {len(found)} {what}s ({', '.join(found) or 'none'}); "
                        f"choose one with --set {what.replace(' ', '_')}=...")
    return found[0]


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class TrainingData:
    """Everything the driver prepares. Tables hold one row per latent with its compound/confounder codes."""

    vae_id: str
    encoder_id: str
    latent_shape: tuple[int, int, int]
    latents: InputRef          # the LatentCache record the rows come from
    embeddings: InputRef       # the compound vectors (kind Embeddings: ids and values hashed here)
    train: pa.Table            # Metadata_LatentRow, Metadata_JCP2022, compound_idx, confounders (list<int64>[4])
    val: pa.Table              # same columns; held-out batches, unknown confounders coded as null indices
    vocab: Any                 # ConfounderVocab
    compound_ids: np.ndarray   # (N,) JCP2022 ids, row order of the matrices below
    pooled: np.ndarray         # (N, D) float32
    tokens: np.ndarray | None  # (N, T, D) float16 or None
    mask: np.ndarray | None    # (N, T) bool or None
    rejects: pa.Table          # unit/item/reason
    counts: dict
    support: Any = None        # DataFrame (source, batch, well) observed with treatments in the training rows


def _read_index(lake, vae_id: str) -> pa.Table:
    import pyarrow.parquet as pq

    base = f"latents/index/vae={vae_id}"
    parts = [p for p in lake.ls(base) if p.endswith(".parquet")]
    if not parts:
        raise UserError(f"no latent_index parts in {lake.uri_of(base)}; run `cpldm ingest` first")
    tables = []
    for rel in parts:
        with lake.fs.open(lake.fs_path(rel), "rb") as fh:
            tables.append(pq.read_table(fh, columns=["Metadata_LatentRow", "Metadata_SiteKey", "Metadata_Source",
                                                     "Metadata_Batch", "Metadata_Well", "Metadata_JCP2022"]))
    return pa.concat_tables(tables, promote_options="permissive")


def _latent_array_shape(lake, vae_id: str) -> tuple[int, ...]:
    import zarr

    rel = latents_rel(vae_id)
    try:
        group = zarr.open_group(store=lake.zarr_store(rel, read_only=True), mode="r")
        return tuple(group[zarr_layouts.LATENTS.array].shape)
    except (FileNotFoundError, KeyError) as exc:
        raise UserError(f"{lake.uri_of(rel)} has no '{zarr_layouts.LATENTS.array}' array: {exc}") from None


def prepare_data(lake, cfg: TrainConfig, run: str = "") -> TrainingData:
    """Read and filter the inputs (split, embeddings), fit the vocabulary. Pure driver-side I/O, no Ray."""
    from cpldm_core.denoiser import ConfounderVocab
    from pipelines.embed import load_embeddings

    vae_id = _pick(lake, cfg.vae_id, "latents/index", "vae", "vae id")
    encoder_id = _pick(lake, cfg.encoder_id, "embeddings", "encoder", "encoder id")
    cache = read_artifact(lake, LatentCache, vae_id)   # what made the latents: one read, an error naming ingest
    shape = _latent_array_shape(lake, vae_id)
    if tuple(shape[1:]) != tuple(cache.latent_shape):
        raise UserError(f"{lake.uri_of(latents_rel(vae_id))} holds latents {tuple(shape[1:])} but its LatentCache "
                        f"record says {tuple(cache.latent_shape)}; rerun `cpldm ingest --vae-id {vae_id} --force`")
    index = _read_index(lake, vae_id).to_pandas()
    bad_rows = index.loc[(index["Metadata_LatentRow"] < 0) | (index["Metadata_LatentRow"] >= shape[0])]
    if len(bad_rows):
        raise UserError(f"latent_index (vae={vae_id}) row {bad_rows['Metadata_LatentRow'].iloc[0]} is outside "
                        f"{lake.uri_of(latents_rel(vae_id))} ({shape[0]} rows); rerun `cpldm ingest`")
    split_c = lake.read_named("split_compounds").to_pandas()
    split_b = lake.read_named("split_batches").to_pandas()
    seen = set(split_c.loc[split_c["Metadata_CompoundSplit"] == "seen", "Metadata_JCP2022"])
    known_compounds = set(split_c["Metadata_JCP2022"])
    train_batches = set(split_b.loc[split_b["Metadata_BatchSplit"] == "train", "Metadata_Batch"])
    heldout_batches = set(split_b.loc[split_b["Metadata_BatchSplit"] == "heldout", "Metadata_Batch"])

    emb = load_embeddings(lake, encoder_id)
    id_to_idx = {cid: i for i, cid in enumerate(emb.ids)}
    if cfg.compound_input == "tokens" and emb.tokens is None:
        raise UserError(f"compound_input=tokens but encoder {encoder_id!r} has no token embeddings (MolT5 only)")

    rejects = []
    is_seen = index["Metadata_JCP2022"].isin(seen)
    unknown = ~index["Metadata_JCP2022"].isin(known_compounds)
    no_split_batch = ~index["Metadata_Batch"].isin(train_batches | heldout_batches)
    has_emb = index["Metadata_JCP2022"].isin(id_to_idx.keys())
    for mask, reason in ((unknown, "compound not in split_compounds"),
                         (no_split_batch & ~unknown, "batch not in split_batches"),
                         (is_seen & ~no_split_batch & ~has_emb, f"no embedding for the compound (encoder {encoder_id})")):
        for row in index.loc[mask].itertuples():
            rejects.append({"unit": run or STAGE, "item": row.Metadata_SiteKey,
                            "reason": f"{reason}: {row.Metadata_JCP2022} / {row.Metadata_Batch}"})
    usable = is_seen & has_emb
    train_df = index.loc[usable & index["Metadata_Batch"].isin(train_batches)].reset_index(drop=True)
    val_df = index.loc[usable & index["Metadata_Batch"].isin(heldout_batches)].reset_index(drop=True)
    if len(train_df) < cfg.batch_size * cfg.workers:
        raise UserError(f"only {len(train_df)} training latents (seen compounds x train batches) for a batch of "
                        f"{cfg.batch_size} on each of {cfg.workers} workers; lower batch_size or workers")
    if len(val_df) > cfg.val_max_rows:
        # deterministic subset: the same validation rows for every run on this lake
        val_df = val_df.sort_values("Metadata_LatentRow").iloc[
            np.linspace(0, len(val_df) - 1, cfg.val_max_rows).round().astype(int)].reset_index(drop=True)

    vocab = ConfounderVocab.fit(train_df["Metadata_Source"], train_df["Metadata_Batch"], train_df["Metadata_Well"])

    def table(df, allow_unknown: bool) -> pa.Table:
        codes = vocab.encode(list(df["Metadata_Source"]), list(df["Metadata_Batch"]), list(df["Metadata_Well"]),
                             allow_unknown=allow_unknown).numpy()
        return pa.table({
            "Metadata_LatentRow": pa.array(df["Metadata_LatentRow"].to_numpy(np.int64)),
            "Metadata_JCP2022": pa.array(df["Metadata_JCP2022"].astype(str).tolist(), pa.string()),
            "compound_idx": pa.array(df["Metadata_JCP2022"].map(id_to_idx).to_numpy(np.int64)),
            "confounders": pa.array(list(codes), pa.list_(pa.int64())),
        })

    train_tbl, val_tbl = table(train_df, False), table(val_df, True)
    counts = {"index_rows": len(index), "train_rows": len(train_df), "val_rows": len(val_df),
              "excluded_unseen": int((~is_seen & ~unknown).sum()),
              "excluded_heldout_val_unused": int((usable & index["Metadata_Batch"].isin(heldout_batches)).sum()
                                                 - len(val_df)),
              "rejected": len(rejects), "train_compounds": int(train_df["Metadata_JCP2022"].nunique())}
    rej = pa.Table.from_pylist(rejects, schema=pa.schema([("unit", pa.string()), ("item", pa.string()),
                                                          ("reason", pa.string())]))
    from cpldm_core.design import confounder_support
    support = confounder_support(train_df)   # p'(C) of generation: what this model saw with treatments
    return TrainingData(vae_id, encoder_id, tuple(cache.latent_shape), cache.ref(), embeddings_ref(encoder_id, emb),
                        train_tbl, val_tbl, vocab, emb.ids, emb.pooled.astype(np.float32), emb.tokens, emb.mask, rej,
                        counts, support)


def embeddings_ref(encoder_id: str, emb) -> InputRef:
    """The compound vectors as an input: sha256 of their ids and float32 values (pooled, tokens when present)."""
    h = hashlib.sha256("\n".join(map(str, emb.ids)).encode())
    for arr in (emb.pooled, emb.tokens, emb.mask):
        if arr is not None:
            h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return InputRef(kind="Embeddings", id=encoder_id, fingerprint=h.hexdigest())


def training_data_fingerprint(data: "TrainingData") -> str:
    """sha256 of the training rows (latent row, compound, confounder codes) in the order they were selected."""
    h = hashlib.sha256(np.ascontiguousarray(data.train.column("Metadata_LatentRow").to_numpy(), np.int64).tobytes())
    h.update("\n".join(data.train.column("Metadata_JCP2022").to_pylist()).encode())
    codes = data.train.column("confounders").to_pylist()
    h.update(np.asarray(codes, dtype=np.int64).tobytes())
    return h.hexdigest()


def model_card(run: str, cfg: TrainConfig, data: "TrainingData", steps_done: int = 0) -> ModelCard:
    """The ModelCard of ``run``: what generation needs in one read (kind, confounders and vocabulary, latent
    shape, schedule, VAE and encoder ids) and the inputs it was trained from (LatentCache, Embeddings)."""
    from pipelines.storage import code_version

    settings = config_to_dict(cfg)
    return ModelCard(
        id=run, inputs={"latents": data.latents, "embeddings": data.embeddings},
        config={k: v for k, v in settings.items() if k not in RESOURCE_KEYS and k not in ("vae_id", "encoder_id")},
        resources={k: settings[k] for k in RESOURCE_KEYS}, code_version=code_version(),
        model_kind=cfg.model, confounders=SCM_CONFOUNDERS if cfg.model == "scm" else (),
        vocabulary={k: tuple(map(str, v)) for k, v in data.vocab.to_dict().items()},
        compound_input=cfg.compound_input, latent_shape=tuple(data.latent_shape),
        schedule=config_to_dict(cfg.schedule), vae_id=data.vae_id, encoder_id=data.encoder_id,
        training_data_fingerprint=training_data_fingerprint(data), steps_done=steps_done)


def with_added_defaults(stored: ModelCard, planned: ModelCard) -> ModelCard:
    """``stored`` with the config keys it predates filled in from ``planned`` where ``planned`` holds the
    TrainConfig default, for the resume comparison.

    A TrainConfig key is only ever added with a default that trains exactly as cpldm did before it existed
    (``compound_feature_dropout=0`` draws nothing, ``global_condition=False`` builds the same U-Net), so a run
    whose card lacks the key was trained at that default. A key missing from the card but set to anything
    else in ``planned`` stays a difference (the resume is refused, naming it)."""
    defaults = config_to_dict(TrainConfig())
    added = {k: planned.config[k] for k in planned.config.keys() - stored.config.keys()
             if k in defaults and planned.config[k] == defaults[k]}
    return replace(stored, config={**stored.config, **added}) if added else stored


def read_model_card(lake, run: str) -> ModelCard:
    """The ModelCard of ``models/<run>/`` (one-line error naming `cpldm train --run <run>` when missing/older)."""
    return read_artifact(lake, ModelCard, run)


_TRAIN_TABLES: dict[str, pa.Table] = {}   # per Ray worker process: the training table of the current run


def read_stream_rows(batch: dict[str, np.ndarray], train_ref, lake, zarr_rel: str, seed: int, rank: int,
                     world: int, batch_size: int, grad_accum: int, start_step: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` fn of one rank's sample stream: its local sample numbers (``id``, from
    ``ray.data.range``) -> global stream positions -> training rows (seeded per-epoch permutations) -> the
    :func:`read_latent_rows` columns.

    ``train_ref``: ObjectRef of the training table (Metadata_LatentRow, compound_idx, confounders), fetched once
    per worker process."""
    import ray

    from cpldm_core.diffusion import global_positions, stream_rows

    key = train_ref.hex()
    if key not in _TRAIN_TABLES:
        _TRAIN_TABLES.clear()
        _TRAIN_TABLES[key] = ray.get(train_ref)
    table = _TRAIN_TABLES[key]
    positions = global_positions(batch["id"], rank=rank, world=world, batch_size=batch_size,
                                 grad_accum=grad_accum, start_step=start_step)
    rows, _ = stream_rows(positions, table.num_rows, seed)
    picked = table.take(pa.array(rows))
    confounders = picked.column("confounders").combine_chunks()
    out = read_latent_rows({"Metadata_LatentRow": picked.column("Metadata_LatentRow").to_numpy(),
                            "compound_idx": picked.column("compound_idx").to_numpy(),
                            "confounders": confounders.flatten().to_numpy().reshape(len(rows), -1)},
                           lake, zarr_rel)
    return out


def read_latent_rows(batch: dict[str, np.ndarray], lake, zarr_rel: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` fn: add ``latents`` (b, 8, h, w) float32 read from the Zarr cache by row."""
    import zarr

    group = zarr.open_group(store=lake.zarr_store(zarr_rel, read_only=True), mode="r")
    arr = group[zarr_layouts.LATENTS.array]
    rows = np.asarray(batch["Metadata_LatentRow"], dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *arr.shape[1:]), dtype=np.float32)
    if len(rows):
        out[order] = arr.get_orthogonal_selection((rows[order],)).astype(np.float32)
    confounders = np.stack([np.asarray(c, dtype=np.int64) for c in batch["confounders"]]) if len(rows) \
        else np.zeros((0, 4), np.int64)
    return {"Metadata_LatentRow": rows, "compound_idx": np.asarray(batch["compound_idx"], dtype=np.int64),
            "confounders": confounders, "latents": out}


# ---------------------------------------------------------------------------------------------- worker
def _history_part(lake, run: str, rows: list[dict]) -> None:
    if not rows:
        return
    steps = [r["step"] for r in rows]
    tbl = pa.Table.from_pylist(rows, schema=pa.schema([
        ("step", pa.int64()), ("epoch", pa.int32()), ("split", pa.string()), ("loss", pa.float64()),
        ("samples_per_s", pa.float64())]))
    lake.write_named("train_history", tbl, part=f"steps-{min(steps):09d}-{max(steps):09d}", partition={"run": run})


def _upload_dir(lake, local: Path, rel: str) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file():
            lake.write_bytes(f"{rel}/{f.name}", f.read_bytes())


def _validation_loss(model, val: dict, scheduler, cfg: TrainConfig, device) -> float:
    """Mean v-loss over the validation latents at ``val_timesteps`` evenly spaced timesteps, fixed noise."""
    import torch

    from cpldm_core.diffusion import v_prediction_loss

    n_t = scheduler.config.num_train_timesteps
    ts = np.linspace(0, n_t - 1, cfg.val_timesteps + 2)[1:-1].round().astype(int)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(val["latents"]), 64):
            sl = slice(start, start + 64)
            x = val["latents"][sl].to(device)
            for k, t in enumerate(ts):
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + k * 7919 + start)
                loss = v_prediction_loss(model, x, val["compound"][sl].to(device),
                                         val["compound_mask"][sl].to(device) if val["compound_mask"] is not None
                                         else None,
                                         val["confounders"][sl].to(device) if model.kind == "scm" else None,
                                         scheduler=scheduler, generator=gen,
                                         timesteps=torch.full((x.shape[0],), int(t), device=device))
                total += float(loss) * x.shape[0]
                count += x.shape[0]
    model.train()
    return total / max(count, 1)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: the DDP training loop (see module docstring). ``loop_config`` is built by :func:`run`."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
    from cpldm_core.diffusion import ema_decay_at, lr_at, make_scheduler, step_seed, v_prediction_loss

    cfg: TrainConfig = loop_config["cfg"]
    lake, run = loop_config["lake"], loop_config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    vocab = ConfounderVocab.from_dict(loop_config["vocab"])
    compound_np = ray.get(loop_config["compounds_ref"])   # dict(pooled=(N,D), tokens=(N,T,D)|None, mask)
    use_tokens = cfg.compound_input == "tokens"
    comp_table = torch.from_numpy(np.array(compound_np["tokens"] if use_tokens else compound_np["pooled"],
                                             dtype=np.float32)).to(device)
    comp_mask = torch.from_numpy(np.asarray(compound_np["mask"], dtype=bool)).to(device) if use_tokens else None

    torch.manual_seed(cfg.seed)   # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = ConfounderAwareDenoiser(cfg.unet_preset, kind=cfg.model, vocab=vocab,
                                    compound_dim=int(comp_table.shape[-1]), compound_tokens=cfg.compound_tokens,
                                    compound_input=cfg.compound_input, metadata=loop_config["metadata"],
                                    sample_size=int(loop_config["metadata"]["latent_shape"][-1]),
                                    global_condition=cfg.global_condition)
    ema = None
    if cfg.ema_decay > 0 and rank == 0:
        ema = model.clone().requires_grad_(False)

    start_step, epoch, restored_from = 0, 0, None
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_step, epoch, restored_from = int(state["step"]), int(state["epoch"]), int(state["step"])
        log.info("rank %d: resumed from step %d", rank, start_step)
    model = model.to(device)
    if ema is not None:
        ema = ema.to(device)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    core = ddp.module if hasattr(ddp, "module") else ddp
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    state = None

    scheduler = make_scheduler("ddpm", cfg.schedule)
    null_codes = [vocab.null_index(k) for k in range(4)]
    use_bf16 = cfg.bf16 and device.type == "cuda"
    gen = torch.Generator(device=device)   # reseeded at every step (step_seed)
    val = None
    if rank == 0 and cfg.val_every > 0 and loop_config["val_rows"] is not None:
        v = ray.get(loop_config["val_rows"])
        if len(v["latents"]):
            idx = torch.from_numpy(v["compound_idx"]).to(device)
            val = {"latents": torch.from_numpy(v["latents"]), "compound": comp_table[idx].cpu(),
                   "compound_mask": comp_mask[idx].cpu() if comp_mask is not None else None,
                   "confounders": torch.from_numpy(v["confounders"])}

    max_steps = loop_config["max_steps"]
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True   # the stream's order is the training order
    data_ctx.enable_progress_bars = False
    samples = (max_steps - start_step) * cfg.grad_accum * cfg.batch_size
    # ~1,024 sample numbers per block: a few 1-CPU range tasks instead of Ray Data's default ~200 per rank
    stream = ray.data.range(samples, override_num_blocks=max(1, min(1000, -(-samples // 1024)))).map_batches(
        read_stream_rows, batch_size=max(64, cfg.batch_size), batch_format="numpy", num_cpus=cfg.data_cpus,
        fn_kwargs={"train_ref": loop_config["train_ref"], "lake": lake, "zarr_rel": loop_config["zarr_rel"],
                   "seed": cfg.seed, "rank": rank, "world": world, "batch_size": cfg.batch_size,
                   "grad_accum": cfg.grad_accum, "start_step": start_step})
    step, micro, accum, pending, seen_rows = start_step, 0, 0.0, [], set()
    steps_samples = cfg.batch_size * world * cfg.grad_accum   # stream positions one optimiser step consumes
    t_last = time.perf_counter()
    for batch in stream.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, device=device):
        if micro == 0:   # a step's first micro-batch: its noise seed and its epoch (of its first sample)
            gen.manual_seed(step_seed(cfg.seed, rank, step))
            epoch = step * steps_samples // loop_config["train_rows"]
        if cfg.audit_rows:
            seen_rows.update(batch["Metadata_LatentRow"].tolist())
        idx = batch["compound_idx"].long()
        compound = comp_table[idx]
        cmask = comp_mask[idx] if comp_mask is not None else None
        micro += 1
        last_micro = micro == cfg.grad_accum
        sync = ddp.no_sync() if (world > 1 and not last_micro) else _null_context()
        with sync, torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = v_prediction_loss(ddp, batch["latents"].float(), compound, cmask,
                                     batch["confounders"].long() if cfg.model == "scm" else None,
                                     scheduler=scheduler, cond_dropout=cfg.cond_dropout,
                                     confounder_dropout=cfg.confounder_dropout if cfg.model == "scm" else 0.0,
                                     generator=gen, null_codes=null_codes, snr_gamma=cfg.snr_gamma,
                                     compound_feature_dropout=cfg.compound_feature_dropout)
            (loss / cfg.grad_accum).backward()
        accum += float(loss.detach()) / cfg.grad_accum
        if not last_micro:
            continue
        micro = 0
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(core.parameters()),
                                     1.0 - ema_decay_at(step, cfg.ema_decay))
        step += 1
        now = time.perf_counter()
        sps = cfg.batch_size * cfg.grad_accum / max(now - t_last, 1e-9)
        t_last = now
        loss_t = torch.tensor([accum], device=device)
        if world > 1:   # log the loss of the whole global batch, not rank 0's share
            torch.distributed.all_reduce(loss_t)
            loss_t /= world
        pending.append({"step": step, "epoch": epoch, "split": "train", "loss": float(loss_t),
                        "samples_per_s": sps})
        accum = 0.0
        if step == cfg.fail_at_step and restored_from is None and rank == world - 1:
            raise RuntimeError(f"injected failure at step {step} (fail_at_step, first attempt only)")
        if val is not None and step % cfg.val_every == 0:
            pending.append({"step": step, "epoch": epoch, "split": "val", "samples_per_s": None,
                            "loss": _validation_loss(ema if ema is not None else core, val, scheduler, cfg,
                                                     device)})
        if step % cfg.checkpoint_every == 0 or step == max_steps:
            metrics = {"step": step, "epoch": epoch, "loss": pending[-1]["loss"] if pending else float("nan"),
                       "restored_from": -1 if restored_from is None else restored_from}
            if rank == 0:
                _history_part(lake, run, pending)
                if step == max_steps:
                    _export_final(lake, run, ema if ema is not None else core)
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save({"model": core.state_dict(), "optimizer": opt.state_dict(),
                                "ema": ema.state_dict() if ema is not None else None, "step": step,
                                "epoch": epoch, "config": config_to_dict(cfg), "vocab": vocab.to_dict()},
                               Path(tmp) / CHECKPOINT_FILE)
                    (Path(tmp) / "config.json").write_text(json.dumps(core.config_dict(), default=list))
                    (Path(tmp) / "vocab.json").write_text(json.dumps(vocab.to_dict()))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
            pending = []
        if step >= max_steps:
            break
    if step < max_steps:
        raise RuntimeError(f"rank {rank}: the sample stream ended at step {step} of {max_steps}")
    if cfg.audit_rows:
        lake.write_json(f"{run_dir(run)}/audit/rank-{rank}.json",
                        {"rank": rank, "restored_from": restored_from, "rows": sorted(seen_rows)})


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _export_final(lake, run: str, model) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _upload_dir(lake, Path(tmp), final_dir(run))


# ---------------------------------------------------------------------------------------------- driver
def run(lake, config: TrainConfig, run: str | None = None, resume: bool = False) -> dict:
    """Train one model run; returns summary counts (rows, steps, final losses, paths, wall time).

    Args:
        lake: a :class:`pipelines.storage.Lake`.
        config: the training config (``config.model`` is scm or scm-free).
        run: run name (default: the model kind). Output under ``models/<run>/``.
        resume: continue a stopped/finished run from its latest checkpoint (required when ``models/<run>/``
            already holds checkpoints; a finished run is simply reported again).
    """
    from pipelines.ray_runtime import ensure_ray

    t0 = time.perf_counter()
    run = run or config.model
    if not _RUN_NAME.match(run):
        raise UserError(f"run name {run!r} may hold only letters, digits, '_', '.', '-'")
    cfg = config
    has_snapshot = lake.exists(f"{run_dir(run)}/{SNAPSHOT_FILE}")
    if has_snapshot and not resume:
        raise UserError(f"{lake.uri_of(run_dir(run))} already holds a training run; pass --resume to continue it "
                        "or choose another --run name")
    stored = None
    if resume and has_snapshot:   # a run without a card was made by a cpldm without records: an error naming train
        stored = read_record(lake, run_dir(run), ModelCard, run)
        if stored.model_kind != cfg.model:   # cheap check before Ray starts; the full rule follows prepare_data
            raise UserError(f"run {run!r} trains a {stored.model_kind} model, not {cfg.model}")

    ray = ensure_ray()
    free_cpus = ray.cluster_resources().get("CPU", 0) - cfg.workers * cfg.cpus_per_worker
    if free_cpus < max(1.0, cfg.data_cpus):
        # each worker's sample stream starts with `ray.data.range` read tasks of 1 CPU (Ray Data does not fuse
        # them into the data_cpus map tasks), then its latent-reading tasks: without that CPU the run stalls
        raise UserError(f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU leave {free_cpus:g} of the cluster's "
                        f"{ray.cluster_resources().get('CPU', 0):g} CPUs for Ray Data (needs "
                        f"max(1, data_cpus={cfg.data_cpus:g})); lower --workers or --cpus-per-worker")
    data = prepare_data(lake, cfg, run)
    planned = model_card(run, cfg, data)
    if stored is not None:
        compared = with_added_defaults(stored, planned)
        if compared.fingerprint != planned.fingerprint:
            # one rule: resuming continues the same science on the same inputs; resources may change
            raise UserError(f"--resume: run {run!r} was trained with other settings or inputs "
                            f"({', '.join(planned.changed_fields(compared))} differ); choose another --run")
        # the card keeps the config it was first written with, so its fingerprint (which generation runs
        # record as their input) does not change when a resume only adds keys at their defaults
        planned = replace(planned, config=stored.config, steps_done=stored.steps_done)
    write_record(lake, run_dir(run), planned)
    if data.rejects.num_rows:
        lake.write_named("rejects", data.rejects, part=run, partition={"stage": STAGE})
    effective_batch = cfg.batch_size * cfg.workers * cfg.grad_accum
    steps_per_epoch = max(1, data.train.num_rows // effective_batch)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else int(np.ceil(cfg.epochs * steps_per_epoch))
    log.info("train %s: %d training latents (%d compounds), %d validation latents, %d steps of %d latents, "
             "%d worker(s)", run, data.train.num_rows, data.counts["train_compounds"], data.val.num_rows,
             max_steps, effective_batch, cfg.workers)
    metadata = {"schedule": config_to_dict(cfg.schedule), "run": run, "vae_id": data.vae_id,
                "encoder_id": data.encoder_id, "latent_shape": list(data.latent_shape)}
    if stored is None:   # a resumed run keeps the config its first steps were made with
        lake.write_config(run_dir(run), cfg, extra={"run": run, "model": cfg.model, "vae_id": data.vae_id,
                                                    "encoder_id": data.encoder_id,
                                                    "latent_shape": list(data.latent_shape), "max_steps": max_steps,
                                                    "counts": data.counts,
                                                    "confounder_support": {"table": "confounder_support", "model": run,
                                                                           "combinations": len(data.support)}})
    lake.write_json(f"{run_dir(run)}/vocab.json", data.vocab.to_dict())
    lake.write_named("confounder_support", pa.Table.from_pandas(data.support, preserve_index=False), config=cfg,
                     part="support", partition={"model": run})

    zarr_rel = latents_rel(data.vae_id)
    # each worker builds its own sample stream from this table (read_stream_rows): nothing to split here
    train_ref = ray.put(data.train.select(["Metadata_LatentRow", "compound_idx", "confounders"]))
    val_ref = None
    if data.val.num_rows and cfg.val_every > 0:
        val_ref = ray.put(read_latent_rows({k: data.val.column(k).to_numpy(zero_copy_only=False)
                                            for k in ("Metadata_LatentRow", "compound_idx")}
                                           | {"confounders": data.val.column("confounders").to_pylist()},
                                           lake, zarr_rel))
    compounds_ref = ray.put({"pooled": data.pooled, "tokens": data.tokens, "mask": data.mask})

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "lake": lake, "run": run, "vocab": data.vocab.to_dict(),
                           "compounds_ref": compounds_ref, "val_rows": val_ref, "metadata": metadata,
                           "max_steps": max_steps, "train_ref": train_ref, "train_rows": data.train.num_rows,
                           "zarr_rel": zarr_rel},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run, storage_path=lake.fs_path(MODELS_DIR), storage_filesystem=lake.arrow_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    history = read_history(lake, run)
    write_loss_plot(lake, run, history)
    train_h = history.loc[history["split"] == "train"]
    val_h = history.loc[history["split"] == "val"]
    summary = {"run": run, "model": cfg.model, "steps": int(train_h["step"].max()) if len(train_h) else 0,
               "planned_steps": max_steps, **data.counts,
               "history_train_rows": len(train_h), "history_val_rows": len(val_h),
               "first_loss": float(train_h["loss"].iloc[0]) if len(train_h) else None,
               "final_loss": float(train_h["loss"].iloc[-10:].mean()) if len(train_h) else None,
               "final_val_loss": float(val_h["loss"].iloc[-1]) if len(val_h) else None,
               "restored_from": int(result.metrics.get("restored_from", -1)) if result.metrics else -1,
               "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "model_dir": lake.uri_of(final_dir(run)), "wall_s": round(time.perf_counter() - t0, 1)}
    lake.write_json(f"{run_dir(run)}/summary.json", summary)
    write_record(lake, run_dir(run), replace(planned, steps_done=summary["steps"]))
    log.info("train %s: done in %.0f s: %s", run, summary["wall_s"], summary)
    return summary


def read_history(lake, run: str):
    """``train_history`` rows of ``run`` as a pandas DataFrame sorted by (split, step)."""
    rel = f"train_history/run={run}"
    if not lake.exists(rel):
        raise UserError(f"no training history for run {run!r} in {lake.uri}")
    df = lake.read_table(rel).to_pandas()
    return df.sort_values(["split", "step"]).reset_index(drop=True)


def write_loss_plot(lake, run: str, history) -> None:
    """``models/<run>/loss.png``: train loss per step (and a running mean), validation loss per pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    tr = history.loc[history["split"] == "train"]
    va = history.loc[history["split"] == "val"]
    ax.plot(tr["step"], tr["loss"], lw=0.5, alpha=0.4, label="train (per step)")
    if len(tr) > 10:
        ax.plot(tr["step"], tr["loss"].rolling(max(5, len(tr) // 20), min_periods=1).mean(), lw=1.5,
                label="train (running mean)")
    if len(va):
        ax.plot(va["step"], va["loss"], "o-", label="validation (held-out batches)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_title(f"cpldm train: {run}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    lake.write_bytes(f"{run_dir(run)}/loss.png", buf.getvalue())


def load_checkpoint_state(lake, run: str) -> dict:
    """The latest Ray Train checkpoint of ``run`` (``checkpoint.pt`` contents: model, optimizer, ema, step...)."""
    import torch

    ckpts = sorted(p for p in lake.ls(run_dir(run)) if posixpath.basename(p).startswith("checkpoint_")
                   and not p.endswith(".json"))
    if not ckpts:
        raise UserError(f"no checkpoint in {lake.uri_of(run_dir(run))}")
    return torch.load(io.BytesIO(lake.read_bytes(f"{ckpts[-1]}/{CHECKPOINT_FILE}")), map_location="cpu",
                      weights_only=False)


def load_model(lake, run: str):
    """The exported model of ``run`` (``models/<run>/final/``) as a ConfounderAwareDenoiser in eval mode."""
    from cpldm_core.denoiser import ConfounderAwareDenoiser

    rel = final_dir(run)
    if not lake.exists(f"{rel}/weights.pt"):
        raise UserError(f"{lake.uri_of(rel)} holds no exported model; run `cpldm train --run {run}` first")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", "vocab.json", "weights.pt"):
            (Path(tmp) / name).write_bytes(lake.read_bytes(f"{rel}/{name}"))
        return ConfounderAwareDenoiser.from_pretrained(tmp)


# ---------------------------------------------------------------------------------------------- CLI
def load_train_config(preset: str = "demo", config_file: str | None = None,
                      overrides: list[str] | dict | None = None, **options) -> TrainConfig:
    """Preset, then YAML file, then ``--set`` overrides, then explicit CLI options (model, workers...)."""
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    cfg = load_config(TrainConfig, config_file, overrides, base=TRAIN_PRESETS[preset])
    given = {k: v for k, v in options.items() if v is not None}
    return replace(cfg, **given) if given else cfg


def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = subparsers.add_parser("train", help="train the scm / scm-free latent diffusion model with Ray Train",
                              description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("scm", "scm-free"), default=None,
                   help="scm (default): compound + source/batch/well tokens; scm-free: compound tokens only")
    add_config_arguments(p, TRAIN_PRESETS, TrainConfig,
                         preset_help="stage preset (U-Net size, steps, lr, batch): tiny | demo | small | paper")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU, gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides the preset's max_steps)")
    p.add_argument("--run", default=None, type=lake_name, help="run name (default: the model kind); output models/<run>/")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from pipelines.cli import lake_from_args

    cfg = load_train_config(args.preset, args.config, args.set, model=args.model, workers=args.workers,
                            gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                            max_steps=args.steps)
    summary = run(lake_from_args(args), cfg, run=args.run, resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    return 0
