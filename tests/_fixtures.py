"""Lakes the tests (and the benchmarks) build: what the stages upstream of the one under test would write.

- :func:`build_toy_lake`: a trained-looking lake for ``cpldm generate`` (random-weight tiny U-Net and VAE of
  the real classes, their VaeModel/LatentCache/ModelCard records, embeddings, split tables);
- :func:`write_evaluation_lake`: ``features_well`` of ``real`` and two generation runs with their ProfileSet
  records, annotations, split and truth tables for ``cpldm evaluate``;
- :func:`manifest_rows` / :func:`write_manifest_parts`: ``synthetic_manifest`` parts for ``cpldm lake compact``.

Benchmarks import these from here (never the other way round: tests do not depend on ``benchmarks/``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core.evaluation.simulated_profiles import simulate_profiles
from storage_schemas import artifacts as art
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

# ---------------------------------------------------------------------------------------------- generate
SOURCES = ("source_1", "source_2", "source_3")
BATCHES = tuple((s, f"{s}_2024_0{k + 1}_Batch{k + 1}") for s in SOURCES for k in range(2))
WELLS = tuple(f"{r}{c:02d}" for r in "ABCD" for c in range(1, 7))
TOY_ENCODER = "toy-enc"
TOY_VAE = "toy-vae"


def toy_compounds(n: int) -> list[str]:
    return [DMSO_JCP2022] + [f"JCP2022_{k:06d}" for k in range(1, n)]


def toy_model_card(run: str, latents, vocab, latent_side: int, kind: str | None = None):
    """The ModelCard ``cpldm train`` would write for a toy model (``kind`` defaults to the run name)."""
    from cpldm_core.diffusion import ScheduleConfig

    kind = kind or run
    return art.ModelCard(
        id=run, inputs={"latents": latents, "embeddings": art.InputRef("Embeddings", TOY_ENCODER, "e" * 64)},
        model_kind=kind, confounders=("Metadata_Source", "Metadata_Batch", "Metadata_Well") if kind == "scm" else (),
        vocabulary={k: tuple(map(str, v)) for k, v in vocab.to_dict().items()}, compound_input="pooled",
        latent_shape=(8, latent_side, latent_side), schedule=ScheduleConfig().to_dict(), vae_id=TOY_VAE,
        encoder_id=TOY_ENCODER, training_data_fingerprint="toy")


def build_toy_lake(lake, kinds=("scm", "scm-free"), n_compounds: int = 6, unet: str = "tiny",
                   latent_side: int = 4, vae_arch: str = "tiny", compound_dim: int = 16, seed: int = 0) -> dict:
    """Write a trained-looking toy lake: ``models/<kind>/final`` and its ModelCard for each kind, ``vae/toy-vae``
    (VaeModel record), ``latents/toy-vae/normalisation.json`` and its LatentCache record, an ``embeddings``
    partition (committed), ``split_compounds`` and ``split_batches``. Images are ``8 * latent_side`` px square. Returns what was written."""
    import torch

    from cpldm_core.autoencoder import build_vae
    from cpldm_core.denoiser import UNET_PRESETS, ConfounderAwareDenoiser, ConfounderVocab
    from cpldm_core.diffusion import ScheduleConfig
    from pipelines.embed import unit_stage

    compounds = toy_compounds(n_compounds)
    vocab = ConfounderVocab.fit([s for s, _ in BATCHES], [b for _, b in BATCHES], WELLS)
    unet_cfg = dict(UNET_PRESETS[unet], sample_size=latent_side)
    metadata = {"schedule": ScheduleConfig().to_dict(), "vae_id": TOY_VAE, "encoder_id": TOY_ENCODER}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in kinds:
            torch.manual_seed(seed)   # per component: the weights must not depend on which kinds were built
            model = ConfounderAwareDenoiser(unet=unet_cfg, kind=kind, vocab=vocab, compound_dim=compound_dim,
                                            metadata=metadata)
            model.save_pretrained(tmp / kind)
            for f in sorted((tmp / kind).iterdir()):
                lake.write_bytes(f"models/{kind}/final/{f.name}", f.read_bytes())
            # what `cpldm train` records beside a model: every toy batch x well was "observed with treatments"
            lake.write_named("confounder_support", pa.table(
                {"Metadata_Source": [s for s, _ in BATCHES for _ in WELLS],
                 "Metadata_Batch": [b for _, b in BATCHES for _ in WELLS],
                 "Metadata_Well": [w for _ in BATCHES for w in WELLS]}), part="support", partition={"model": kind})
        torch.manual_seed(seed + 1)
        vae = build_vae(vae_arch, sample_size=8 * latent_side)
        vae.save_pretrained(tmp / "vae")
        for f in sorted((tmp / "vae").iterdir()):
            lake.write_bytes(f"vae/{TOY_VAE}/{f.name}", f.read_bytes())
    lake.write_json(f"latents/{TOY_VAE}/normalisation.json",
                    {"method": "global-per-channel-robust-percentile", "low": [100.0, 200.0, 150.0, 120.0, 90.0],
                     "high": [40000.0, 30000.0, 35000.0, 25000.0, 20000.0]})
    # the records fit-vae, ingest and train write: generation reads the model, VAE and crop through them
    vae_rec = art.VaeModel(id=TOY_VAE, inputs={}, origin="external", architecture=vae_arch,
                           config={"source": "random weights (tests/_fixtures.py)"})
    art.write_record(lake, f"vae/{TOY_VAE}", vae_rec)
    cache = art.LatentCache(id=TOY_VAE, inputs={"vae": vae_rec.ref()}, vae_id=TOY_VAE,
                            vae_location=f"lake:vae/{TOY_VAE}", channels=tuple(CHANNELS),
                            channel_groups=((0, 1, 2), (2, 3, 4)), crop_mode="centre", crop_size=8 * latent_side,
                            latent_shape=(8, latent_side, latent_side))
    art.write_record(lake, f"latents/{TOY_VAE}", cache)
    for kind in kinds:
        art.write_record(lake, f"models/{kind}", toy_model_card(kind, cache.ref(), vocab, latent_side))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(compounds), compound_dim)).astype(np.float32)
    table = pa.table({
        "Metadata_JCP2022": compounds, "Metadata_InChIKey": [f"KEY{k}" for k in range(len(compounds))],
        "Metadata_CanonicalSMILES": ["C" * (k + 1) for k in range(len(compounds))],
        "embedding": pa.array(list(vectors), type=pa.list_(pa.float32())),
        "Metadata_TokenRow": pa.nulls(len(compounds), pa.int64())})
    lake.write_named("embeddings", table, part="part-toy", partition={"encoder": TOY_ENCODER})
    lake.commit_unit(unit_stage(TOY_ENCODER), "part-toy")
    split = ["seen" if k % 3 else "unseen" for k in range(len(compounds))]
    lake.write_named("split_compounds", pa.table({"Metadata_JCP2022": compounds, "Metadata_CompoundSplit": split}))
    lake.write_named("split_batches", pa.table({"Metadata_Source": [s for s, _ in BATCHES],
                                                "Metadata_Batch": [b for _, b in BATCHES],
                                                "Metadata_BatchSplit": ["train"] * len(BATCHES)}))
    return {"compounds": compounds, "vocab": vocab, "image_side": 8 * latent_side}


# ---------------------------------------------------------------------------------------------- evaluate
def features_table(meta: pd.DataFrame, values: np.ndarray, names, draw=None) -> pa.Table:
    """A ``features_well`` part: the six metadata columns, Metadata_Draw (null for real wells), then features."""
    draws = pa.array(draw, pa.int32()) if draw is not None else pa.nulls(len(meta), pa.int32())
    cols = {c: meta[c].astype(str).to_numpy() for c in ("Metadata_Source", "Metadata_Batch", "Metadata_Plate",
                                                        "Metadata_Well", "Metadata_JCP2022", "Metadata_pert_type")}
    table = pa.table({**cols,
                      "Metadata_Draw": draws,
                      "Metadata_SiteCount": pa.array(np.full(len(meta), 4), pa.int32())})
    for j, n in enumerate(names):
        table = table.append_column(n, pa.array(values[:, j], pa.float32()))
    return table


def synthetic_draws(world, draws, batch_strength, seed):
    """Draw-level rows: each compound x draw gets a uniformly drawn batch (independent of the compound)."""
    rng = np.random.default_rng(seed)
    truth, names = world["truth"], world["features"]
    loadings = np.random.default_rng(99).normal(size=(truth.shape[1], len(names))) / np.sqrt(truth.shape[1])
    offsets = rng.normal(size=(4, len(names))) * batch_strength
    rows, values = [], []
    compounds = list(truth.index) + [DMSO_JCP2022]
    for cmp in compounds:
        effect = truth.loc[cmp].to_numpy() @ loadings if cmp != DMSO_JCP2022 else np.zeros(len(names))
        for d in range(draws):
            b = int(rng.integers(0, 4))
            rows.append({"Metadata_Source": f"source_{1 + b % 2}", "Metadata_Batch": f"batch_{b}",
                         "Metadata_Plate": "synthetic", "Metadata_Well": f"A{d + 1:02d}", "Metadata_JCP2022": cmp,
                         "Metadata_pert_type": "negcon" if cmp == DMSO_JCP2022 else "trt", "draw": d})
            values.append(effect + offsets[b] + 0.5 * rng.normal(size=len(names)))
    meta = pd.DataFrame(rows)
    return meta, np.asarray(values, np.float32)


def write_profile_set(lake, dataset: str, kind: str, inputs: dict) -> None:
    """The ProfileSet record ``cpldm profile`` writes beside a dataset's profiles (evaluate names it as input)."""
    art.write_record(lake, art.artifact_dir("ProfileSet", dataset),
                     art.ProfileSet(id=dataset, inputs=inputs, dataset_kind=kind))


def write_evaluation_lake(lake, n_compounds: int = 48, n_features: int = 24, seed: int = 0) -> dict:
    """Write what ``cpldm evaluate`` reads: ``features_well`` of ``real`` (a confounded simulated world) and of two
    generation runs (``scm-N3``, ``scm-free-N3``, with their ``synthetic/<run>/config.json``), annotations, the
    compound split and the truth. Returns the simulated world. ``benchmarks/bench_evaluate.py`` uses it too."""
    world = simulate_profiles(n_compounds=n_compounds, n_moas=4, n_features=n_features, wells_per_compound=2,
                              n_batches=4, dmso_per_batch=8, batch_strength=1.0, confounded=True, seed=seed)
    names = world["features"]
    meta, values = world["meta"], world["values"]
    for plate, rows in meta.groupby("Metadata_Plate").groups.items():
        lake.write_named("features_well", features_table(meta.loc[rows], values[rows], names),
                         part=f"plate-{plate}", partition={"dataset": "real"})
    for k, (run, kind) in enumerate((("scm-N3", "scm"), ("scm-free-N3", "scm-free"))):
        smeta, svalues = synthetic_draws(world, 3, 1.0 if kind == "scm" else 2.0, seed=seed + 1 + k)
        lake.write_named("features_well", features_table(smeta, svalues, names, smeta["draw"].to_numpy()),
                         part="block-0", partition={"dataset": run})
        lake.write_json(f"synthetic/{run}/config.json", {"config": {}, "generation": {"model_kind": kind, "draws": 3}})
        write_profile_set(lake, run, "generated", {"images": art.InputRef("GenerationRun", run, "g" * 64)})
    write_profile_set(lake, "real", "real", {"catalog": art.InputRef("Catalog", "sites", "c" * 64)})
    ann = world["annotations"]
    lake.write_named("annotations_moa", pa.table({"Metadata_JCP2022": ann["Metadata_JCP2022"].to_numpy(),
                                                  "Metadata_InChIKey": pa.nulls(len(ann), pa.string()),
                                                  "Metadata_moa": ann["Metadata_moa"].to_numpy()}))
    tgt = ann.assign(t=ann["Metadata_target"].str.split("|")).explode("t")
    lake.write_named("annotations_target", pa.table({"Metadata_JCP2022": tgt["Metadata_JCP2022"].to_numpy(),
                                                     "Metadata_InChIKey": pa.nulls(len(tgt), pa.string()),
                                                     "Metadata_target": tgt["t"].to_numpy()}))
    split = world["split"]
    lake.write_named("split_compounds", pa.table({"Metadata_JCP2022": split.index.to_numpy(),
                                                  "Metadata_CompoundSplit": split.to_numpy()}))
    truth = world["truth"].reset_index()
    truth.insert(1, "Metadata_moa", world["moa_of"].loc[truth["Metadata_JCP2022"]].to_numpy())
    lake.write_named("truth_compounds", pa.Table.from_pandas(truth, preserve_index=False))
    return world


# ---------------------------------------------------------------------------------------------- lake compaction
MANIFEST_RUN = "bench-run"
MANIFEST_SOURCES = ("source_1", "source_2", "source_3", "source_4")


def manifest_rows(start: int, n: int, run: str = MANIFEST_RUN) -> pa.Table:
    """Design rows ``start .. start + n`` of a generation manifest (schema ``synthetic_manifest``)."""
    i = np.arange(start, start + n, dtype=np.int64)
    wells = np.array([f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)])
    return pa.table({
        "run": [run] * n, "Metadata_DesignRow": i, "Metadata_Block": i // 8,
        "Metadata_JCP2022": np.char.add("JCP2022_", np.char.zfill((i // 40).astype(str), 6)),
        "Metadata_Draw": (i % 10).astype(np.int32), "Metadata_Replicate": (i % 4).astype(np.int32),
        "Metadata_Source": np.array(MANIFEST_SOURCES)[i % len(MANIFEST_SOURCES)],
        "Metadata_Batch": np.char.add(np.array(MANIFEST_SOURCES)[i % len(MANIFEST_SOURCES)], "_batch1"),
        "Metadata_Well": wells[i % len(wells)], "Metadata_Seed": i * 7919 + 1, "Metadata_ImageRow": i,
        "Metadata_Model": ["scm"] * n, "Metadata_ModelKind": ["scm"] * n, "Metadata_Sampler": ["dpm++"] * n,
        "Metadata_SamplerSteps": np.full(n, 20, np.int32), "Metadata_GuidanceScale": np.ones(n, np.float32)})


def write_manifest_parts(lake, rows: int, parts: int, run: str = MANIFEST_RUN,
                         config: dict | None = None) -> None:
    """``rows`` manifest rows of ``run`` in ``parts`` parts, each written as ``cpldm generate`` writes one."""
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    for k in range(parts):
        lake.write_named("synthetic_manifest", manifest_rows(int(bounds[k]), int(bounds[k + 1] - bounds[k]), run),
                         config=config or {"run": run, "sampler": "dpm++"}, part=f"block-{k:06d}",
                         partition={"run": run})


# ---------------------------------------------------------------------------------------------- unit claims
def hold_claim(lake, stage: str, unit: str, pid: int) -> None:
    """Write the claim that a live run (process ``pid`` on this host) holds on ``unit`` of ``stage``."""
    import socket
    import time

    lake.write_json(f"_claims/{stage}/{unit}.json", {"host": socket.gethostname(), "pid": pid, "time": time.time()})
