"""``cpldm fit-vae``: fit a small diffusers ``AutoencoderKL`` on the lake's training images.

The embedded default when no SDXL VAE weights are available. One Ray task (``num_cpus``/``num_gpus`` from
the config) reads a deterministic sample of training sites (seen compounds, train batches), normalises them
with global robust percentiles (as ingest does), cuts random crops, trains on both channel groups as
3-channel samples, and returns the model. Written to ``vae/<vae_id>/``:

- ``config.json`` + ``diffusion_pytorch_model.safetensors``: diffusers format (``AutoencoderKL.from_pretrained``),
  ``scaling_factor`` set to 1/std of the training latents;
- ``normalisation.json``, ``history.json``, ``fit/config.json`` (the FitVaeConfig and code version);
- ``_artifact.json``: the :class:`storage_schemas.artifacts.VaeModel` record ingest reads (id, science config,
  fingerprint, resources apart);
- ``reconstruction.png`` (crops and their reconstructions, per channel) and ``reconstruction_error.png``
  (per-channel MSE and the loss curve).

Committed as unit ``<vae_id>`` of stage ``fit-vae``. A rerun with the same science fields returns the stored
summary (resources -- ``num_cpus``, ``num_gpus`` -- may differ); with other science fields it is refused,
naming them, unless ``--force`` (a refit changes the VAE every latent cache made with it was encoded by).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tempfile
import time

import numpy as np

from cpldm_core import images as im
from cpldm_core.autoencoder import FIT_VAE_PRESETS, FitVaeConfig
from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from storage_schemas import columns as c
from storage_schemas.artifacts import InputRef, VaeModel, fingerprint_of, read_record, write_record

log = logging.getLogger(__name__)

STAGE = "fit-vae"
#: FitVaeConfig fields that only choose resources (excluded from the VAE's fingerprint).
RESOURCE_KEYS = ("num_cpus", "num_gpus")
#: Crops of the sample set aside (not trained on) for the reconstruction figures.
EVAL_CROPS = 16


def _plots(x: np.ndarray, rec: np.ndarray, mse: np.ndarray, history: list[dict]) -> tuple[bytes, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(4, len(x))
    fig, axes = plt.subplots(2 * n, 5, figsize=(10, 4 * n), squeeze=False)
    for i in range(n):
        for j, ch in enumerate(c.CHANNELS):
            for k, (arr, label) in enumerate(((x, "input"), (rec, "recon"))):
                ax = axes[2 * i + k, j]
                ax.imshow(arr[i, j], cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0 and k == 0:
                    ax.set_title(ch)
                if j == 0:
                    ax.set_ylabel(f"crop {i} {label}")
    fig.tight_layout()
    buf1 = io.BytesIO()
    fig.savefig(buf1, format="png", dpi=80)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(c.CHANNELS, mse.mean(axis=0), yerr=mse.std(axis=0), capsize=3)
    a1.set_ylabel("MSE in [-1, 1] units (held-out crops)")
    a1.set_title("reconstruction error per channel")
    a2.plot([h["step"] for h in history], [h["mse"] for h in history])
    a2.set_xlabel("step"), a2.set_ylabel("training MSE"), a2.set_yscale("log"), a2.set_title("training loss")
    fig.tight_layout()
    buf2 = io.BytesIO()
    fig.savefig(buf2, format="png", dpi=80)
    plt.close(fig)
    return buf1.getvalue(), buf2.getvalue()


def fit_task(endpoint_url: str | None, records: list[dict], norm: dict, cfg: dict) -> dict:
    """Ray task body: read, crop, train, evaluate. Returns the saved model files, history and figures."""
    import torch
    from cpldm_core.autoencoder import (ChannelGroupAutoencoder, build_vae, fit_small_vae, group_samples,
                                        random_crops, reconstruction_errors)
    from pipelines.ingest import SiteReader

    config = FitVaeConfig(**{k: v for k, v in cfg.items()})
    torch.set_num_threads(max(1, int(config.num_cpus)))
    n = im.Normalisation.from_dict(norm)
    reader = SiteReader(endpoint_url=endpoint_url, illumination="auto")
    rng = np.random.default_rng(config.seed)
    crops = []
    for img in reader.read_sites(records):
        if isinstance(img, Exception):
            continue
        crops.append(random_crops(im.normalise(img, n.low, n.high), config.crop_size, config.crops_per_site, rng))
    if not crops:
        raise UserError("fit-vae: no training site could be read")
    crops = np.concatenate(crops)
    perm = rng.permutation(len(crops))
    n_eval = min(EVAL_CROPS, max(1, len(crops) // 5))
    eval_x, train_x = crops[perm[:n_eval]], crops[perm[n_eval:]] if len(crops) > n_eval else crops[perm]
    # initial weights from the config's seed, not from whatever the (reused) Ray worker's global RNG holds:
    # a refit or a rerun of a killed stage must give the same VAE
    torch.manual_seed(config.seed)
    vae = build_vae(config.architecture, sample_size=config.crop_size)
    device = "cuda" if config.num_gpus and torch.cuda.is_available() else "cpu"
    history = fit_small_vae(vae, group_samples(train_x), config.steps, config.batch_size, config.lr,
                            config.kl_weight, seed=config.seed, device=device,
                            on_step=lambda s, r: (s % 50 == 0) and print(f"fit-vae step {s}: mse {r['mse']:.4f}"))
    vae.to("cpu")
    model = ChannelGroupAutoencoder(vae)
    rec, mse = reconstruction_errors(model, eval_x)
    png, err_png = _plots(eval_x, rec, mse, history)
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        files = {name: open(os.path.join(tmp, name), "rb").read() for name in os.listdir(tmp)}
    return {"files": files, "history": history, "reconstruction_png": png, "error_png": err_png,
            "mse_per_channel": mse.mean(axis=0).tolist(), "train_crops": len(train_x), "eval_crops": len(eval_x),
            "scaling_factor": float(vae.config.scaling_factor)}


def vae_record(config: FitVaeConfig, sample_keys, scaling_factor: float = 1.0,
               eval_mse_per_channel=()) -> VaeModel:
    """The VaeModel record of a fit: science config (resources apart) and the training sites it saw."""
    from pipelines.storage import code_version

    cfg = config_to_dict(config)
    return VaeModel(
        id=config.vae_id,
        inputs={"catalog": InputRef(kind="Catalog", id="sites", fingerprint=fingerprint_of(sorted(sample_keys)))},
        origin="fit-vae", architecture=config.architecture,
        config={k: v for k, v in cfg.items() if k not in RESOURCE_KEYS and k != "vae_id"},
        resources={k: cfg[k] for k in RESOURCE_KEYS}, code_version=code_version(),
        scaling_factor=float(scaling_factor), eval_mse_per_channel=tuple(float(v) for v in eval_mse_per_channel))


def register_vae(lake, vae_id: str, directory: str, note: str) -> VaeModel:
    """Copy a diffusers ``AutoencoderKL`` directory into ``vae/<vae_id>/`` with an ``external`` VaeModel record.

    For VAEs not fitted by ``fit-vae`` (tests, benchmarks, weights from elsewhere) that ingest should find by
    lake name. ``note`` says where the weights came from; it is the record's science identity, with the
    weights' sha256 (so replacing the files changes the fingerprint).
    """
    import hashlib

    from pipelines.ingest import VAE_WEIGHT_FILES
    from pipelines.storage import code_version

    digest = hashlib.sha256()
    for name in VAE_WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            data = open(path, "rb").read()
            digest.update(name.encode() + data)
            lake.write_bytes(f"vae/{vae_id}/{name}", data)
    if not lake.exists(f"vae/{vae_id}/config.json"):
        raise UserError(f"{directory}: no diffusers config.json to register as VAE '{vae_id}'")
    scaling = float(json.loads(lake.read_bytes(f"vae/{vae_id}/config.json")).get("scaling_factor", 1.0))
    record = VaeModel(id=vae_id, inputs={}, origin="external", config={"source": note, "sha256": digest.hexdigest()},
                      code_version=code_version(), scaling_factor=scaling)
    write_record(lake, f"vae/{vae_id}", record)
    return record


def run(lake, config: FitVaeConfig, force: bool = False) -> dict:
    """Fit and save ``vae/<config.vae_id>/``.

    Returns:
        {"vae_id", "path", "sites", "train_crops", "eval_crops", "final_mse", "eval_mse_per_channel",
         "scaling_factor", "fingerprint", "seconds"}
    """
    from pipelines.ingest import compute_normalisation, select_sites, site_records, stats_sample
    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    base = f"vae/{config.vae_id}"
    sample = stats_sample(select_sites(lake, "train"), config.max_sites, config.seed)
    planned = vae_record(config, sample["Metadata_SiteKey"])
    if force:
        lake.delete(f"_markers/{STAGE}/{config.vae_id}.json")  # forget only this VAE
    if lake.is_committed(STAGE, config.vae_id):
        stored = read_record(lake, base, VaeModel, config.vae_id)
        if stored.fingerprint != planned.fingerprint:
            raise UserError(f"{lake.uri_of(base)} was fitted with other science settings "
                            f"({', '.join(planned.changed_fields(stored))} differ); pass --force to refit it "
                            f"(latent caches made with it must then be rebuilt), or --vae-id <new name>")
        info = lake.unit_info(STAGE, config.vae_id)
        log.info("fit-vae: %s already fitted (use --force to refit)", config.vae_id)
        return {**info.get("summary", {}), "skipped": True}
    ray = ensure_ray()
    norm = compute_normalisation(lake, sample, "auto", config.low_percentile, config.high_percentile)
    log.info("fit-vae: %d training sites, %s architecture, %d steps", len(sample), config.architecture,
             config.steps)
    task = ray.remote(fit_task).options(num_cpus=config.num_cpus, num_gpus=config.num_gpus or None)
    out = ray.get(task.remote(lake.endpoint_url, site_records(sample), norm.to_dict(), config_to_dict(config)))
    for name, data in out["files"].items():
        lake.write_bytes(f"{base}/{name}", data)
    lake.write_json(f"{base}/normalisation.json", norm.to_dict())
    lake.write_json(f"{base}/history.json", out["history"])
    lake.write_bytes(f"{base}/reconstruction.png", out["reconstruction_png"])
    lake.write_bytes(f"{base}/reconstruction_error.png", out["error_png"])
    lake.write_config(f"{base}/fit", config)
    record = vae_record(config, sample["Metadata_SiteKey"], out["scaling_factor"], out["mse_per_channel"])
    write_record(lake, base, record)
    summary = {"vae_id": config.vae_id, "path": lake.uri_of(base), "sites": len(sample),
               "train_crops": out["train_crops"], "eval_crops": out["eval_crops"],
               "final_mse": out["history"][-1]["mse"] if out["history"] else None,
               "eval_mse_per_channel": out["mse_per_channel"], "scaling_factor": out["scaling_factor"],
               "fingerprint": record.fingerprint}
    lake.commit_unit(STAGE, config.vae_id, {"summary": summary})
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info("fit-vae: %s", summary)
    return summary


def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments, lake_name

    p = subparsers.add_parser("fit-vae", help="fit a small AutoencoderKL on the lake's training crops",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, FIT_VAE_PRESETS, FitVaeConfig)
    p.add_argument("--vae-id", default=None, type=lake_name, help="output name under vae/ (default: the preset's)")
    p.add_argument("--force", action="store_true", help="refit even if already fitted")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.cli import config_from_args, lake_from_args

    cfg = config_from_args(FitVaeConfig, FIT_VAE_PRESETS, args, [f"vae_id={args.vae_id}"] if args.vae_id else [])
    print(json.dumps(run(lake_from_args(args), cfg, force=args.force), indent=2))
    return 0
