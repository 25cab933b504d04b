"""``cpldm train`` end to end with Ray Train (tiny preset, 2 CPU workers, gloo DDP).

One training run on a local lake carries most checks (a Ray Train start costs ~25 s per worker group): a worker
raises once at step 15 and the run must resume from the step-10 checkpoint and finish its planned steps; the
loss must go down on structured latents; the rows each rank consumed must exclude unseen compounds and held-out
batches; the exported model must reproduce the checkpoint's predictions. A short scm-free run on the moto S3
lake checks checkpoints on S3 and ``--resume``.

The helper :func:`write_training_lake` writes the ingest/embed/catalog outputs the stage reads (CONTRACTS.md),
with *structured* latents: per-compound spatial pattern + per-batch channel offset + noise.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

VAE_ID = "test-vae"
ENCODER_ID = "test-enc"
EMB_DIM = 32


@dataclass
class LakeTruth:
    index: pd.DataFrame          # the latent_index rows written
    seen: set                    # seen compounds
    unseen: set
    train_batches: set
    heldout_batches: set


def write_training_lake(lake, size: int = 8, n_seen: int = 6, n_unseen: int = 2, sites_per_combo: int = 6,
                        seed: int = 0, missing_embedding: str | None = None) -> LakeTruth:
    """Write latents.zarr + latent_index + embeddings (+ commit markers) + split tables into ``lake``.

    Two sources with two batches each; batch ``b4`` is held out. Every compound appears in every batch
    (``sites_per_combo`` latents per compound and batch, spread over wells). ``missing_embedding``: a seen compound
    left out of the embeddings table (its rows must be rejected).
    """
    import zarr

    from pipelines import embed

    rng = np.random.default_rng(seed)
    compounds = [f"JCP2022_{i:06d}" for i in range(n_seen + n_unseen)]
    seen, unseen = set(compounds[:n_seen]), set(compounds[n_seen:])
    batches = {"b1": "source_1", "b2": "source_1", "b3": "source_2", "b4": "source_2"}
    train_b, heldout_b = {"b1", "b2", "b3"}, {"b4"}
    wells = ["A01", "A02", "B01", "B02", "C03", "D04"]
    emb = rng.normal(size=(len(compounds), EMB_DIM)).astype(np.float32)
    proj = rng.normal(size=(EMB_DIM, 8 * size * size)).astype(np.float32) / np.sqrt(EMB_DIM)
    batch_offset = {b: rng.normal(scale=0.5, size=(8, 1, 1)).astype(np.float32) for b in batches}

    rows, lat = [], []
    for ci, cid in enumerate(compounds):
        pattern = np.tanh(emb[ci] @ proj).reshape(8, size, size)
        for b, src in batches.items():
            for k in range(sites_per_combo):
                well = wells[(ci + k) % len(wells)]
                plate = f"P{b}"
                rows.append({"Metadata_LatentRow": len(rows), "Metadata_SiteKey": f"{src}/{b}/{plate}/{well}/{k}",
                             "Metadata_Source": src, "Metadata_Batch": b, "Metadata_Plate": plate,
                             "Metadata_Well": well, "Metadata_Site": k, "Metadata_JCP2022": cid,
                             "Metadata_pert_type": "trt", "Metadata_Crop": 0})
                lat.append(pattern + batch_offset[b] + rng.normal(scale=0.1, size=(8, size, size)))
    latents = np.stack(lat).astype(np.float16)
    group = zarr.open_group(store=lake.zarr_store(f"latents/{VAE_ID}/latents.zarr"), mode="w")
    arr = group.create_array("latents", shape=latents.shape, chunks=(1, 8, size, size), dtype="float16")
    arr[:] = latents
    group.attrs.update({"vae_id": VAE_ID, "scaling_factor": 1.0})
    index = pd.DataFrame(rows)
    lake.write_named("latent_index", pa.Table.from_pandas(index, preserve_index=False), part="part-0",
                     partition={"vae": VAE_ID})

    keep = [i for i, c in enumerate(compounds) if c != missing_embedding]
    emb_tbl = pa.table({
        "Metadata_JCP2022": [compounds[i] for i in keep],
        "Metadata_InChIKey": [f"KEY{i}" for i in keep],
        "Metadata_CanonicalSMILES": ["C" * (i + 1) for i in keep],
        "embedding": pa.array([emb[i].tolist() for i in keep], pa.list_(pa.float32())),
        "Metadata_TokenRow": pa.array([None] * len(keep), pa.int64()),
    })
    lake.write_named("embeddings", emb_tbl, part="part-0", partition={"encoder": ENCODER_ID})
    lake.commit_unit(embed.unit_stage(ENCODER_ID), "part-0")

    lake.write_named("split_compounds", pa.table({
        "Metadata_JCP2022": compounds,
        "Metadata_CompoundSplit": ["seen" if c in seen else "unseen" for c in compounds]}))
    lake.write_named("split_batches", pa.table({
        "Metadata_Source": [batches[b] for b in sorted(batches)], "Metadata_Batch": sorted(batches),
        "Metadata_BatchSplit": ["heldout" if b in heldout_b else "train" for b in sorted(batches)]}))
    # the LatentCache record ingest writes beside a cache: train reads the latent shape and its input from it
    from storage_schemas.artifacts import InputRef, LatentCache, write_record
    write_record(lake, f"latents/{VAE_ID}", LatentCache(
        id=VAE_ID, inputs={"vae": InputRef("VaeModel", VAE_ID, "0" * 64),
                           "catalog": InputRef("Catalog", "sites", "1" * 64)},
        vae_id=VAE_ID, latent_shape=(8, size, size)))
    return LakeTruth(index, seen, unseen, train_b, heldout_b)


# ---------------------------------------------------------------------------------------------- tests
TINY = {"cpus_per_worker": 0.5, "data_cpus": 0.25, "workers": 2}


def test_model_card_inputs_and_fingerprint_rule(local_lake):
    """The card train writes (no Ray needed to build it): its latents input is the LatentCache record's ref; the
    fingerprint ignores resources and stopping (max_steps) but follows a science field and the training rows; a
    lake whose cache has no record is one line naming ingest."""
    from storage_schemas.artifacts import ArtifactMissing, LatentCache, read_artifact

    from pipelines import train

    write_training_lake(local_lake)
    cfg = train.load_train_config("tiny", overrides=TINY)
    data = train.prepare_data(local_lake, cfg, "scm")
    card = train.model_card("scm", cfg, data)
    assert card.inputs["latents"] == read_artifact(local_lake, LatentCache, VAE_ID).ref()
    assert card.inputs["embeddings"].id == ENCODER_ID and card.latent_shape == (8, 8, 8)
    assert card.vocabulary == {k: tuple(map(str, v)) for k, v in data.vocab.to_dict().items()}
    assert card.confounders == ("Metadata_Source", "Metadata_Batch", "Metadata_Well")
    resources = dataclasses.replace(cfg, cpus_per_worker=1.0, max_steps=999, val_every=0)
    assert train.model_card("scm", resources, data).fingerprint == card.fingerprint
    assert train.model_card("scm", dataclasses.replace(cfg, lr=1e-5), data).changed_fields(card) == ["config.lr"]
    fewer = dataclasses.replace(data, train=data.train.slice(1))   # one training row less
    assert train.model_card("scm", cfg, fewer).changed_fields(card) == ["training_data_fingerprint"]
    local_lake.delete(f"latents/{VAE_ID}/_artifact.json")
    with pytest.raises(ArtifactMissing, match=f"no LatentCache record.*`cpldm ingest --vae-id {VAE_ID} --force`$"):
        train.prepare_data(local_lake, cfg, "scm")


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    from pipelines import train
    from pipelines.storage import Lake

    lake = Lake(str(tmp_path_factory.mktemp("train") / "lake"))
    lake.init()
    truth = write_training_lake(lake, missing_embedding="JCP2022_000005")
    cfg = train.load_train_config("tiny", overrides={**TINY, "max_steps": 40, "checkpoint_every": 10,
                                                     "val_every": 20, "fail_at_step": 15, "audit_rows": True,
                                                     "ema_decay": 0.9})
    summary = train.run(lake, cfg, run="scm")
    return lake, truth, cfg, summary


def test_run_resumes_after_a_worker_failure_and_finishes(trained):
    from pipelines import train

    lake, _, cfg, summary = trained
    assert summary["restored_from"] == 10          # the injected failure at step 15 restarted from step 10
    assert summary["steps"] == summary["planned_steps"] == 40
    hist = train.read_history(lake, "scm")
    tr = hist.loc[hist["split"] == "train"]
    assert tr["step"].tolist() == list(range(1, 41))   # every planned step exactly once, no duplicates
    assert hist.loc[hist["split"] == "val", "step"].tolist() == [20, 40]
    assert np.isfinite(hist["loss"]).all()
    audits = [lake.read_json(f"models/scm/audit/rank-{r}.json") for r in range(2)]
    assert {a["restored_from"] for a in audits} == {10}
    for name in ("config.json", "vocab.json", "loss.png", "final/weights.pt", "final/config.json"):
        assert lake.exists(f"models/scm/{name}"), name
    assert lake.read_bytes("models/scm/loss.png")[:4] == b"\x89PNG"


def test_loss_decreases_on_structured_latents(trained):
    from pipelines import train

    lake, *_ = trained
    tr = train.read_history(lake, "scm").query("split == 'train'")["loss"].to_numpy()
    assert tr[-10:].mean() < 0.85 * tr[:5].mean()


def test_unseen_compounds_and_heldout_batches_never_reach_training(trained):
    lake, truth, _, summary = trained
    rows = set()
    for r in range(2):
        rows |= set(lake.read_json(f"models/scm/audit/rank-{r}.json")["rows"])
    idx = truth.index.set_index("Metadata_LatentRow")
    used = idx.loc[sorted(rows)]
    assert used["Metadata_JCP2022"].isin(truth.seen).all()
    assert not used["Metadata_JCP2022"].isin(truth.unseen | {"JCP2022_000005"}).any()
    assert used["Metadata_Batch"].isin(truth.train_batches).all()
    ix = truth.index
    allowed = ix.loc[ix["Metadata_JCP2022"].isin(truth.seen) & ix["Metadata_Batch"].isin(truth.train_batches)
                     & (ix["Metadata_JCP2022"] != "JCP2022_000005")]
    assert rows == set(allowed["Metadata_LatentRow"])   # and the shards together cover all of them
    assert summary["train_rows"] == len(allowed)
    # the compound without an embedding is rejected, row by row, with its reason
    rej = lake.read_table("rejects/stage=train").to_pandas()
    n_missing = int(((truth.index["Metadata_JCP2022"] == "JCP2022_000005")
                     & truth.index["Metadata_Batch"].isin(truth.train_batches | truth.heldout_batches)).sum())
    assert len(rej) == n_missing and rej["reason"].str.contains("no embedding").all()
    vocab = json.loads(lake.read_bytes("models/scm/vocab.json"))
    assert set(vocab["batches"]) == truth.train_batches       # held-out batches are not in the vocabulary
    # the confounder support recorded with the model: (source, batch, well) of its training rows with treatments
    from storage_schemas.columns import DMSO_JCP2022
    support = lake.read_table("confounder_support/model=scm").to_pandas()
    trt = allowed[allowed["Metadata_JCP2022"] != DMSO_JCP2022]
    assert set(zip(support["Metadata_Source"], support["Metadata_Batch"], support["Metadata_Well"])) == \
        set(zip(trt["Metadata_Source"], trt["Metadata_Batch"], trt["Metadata_Well"])) and len(support) > 0


def test_exported_model_reproduces_the_checkpoint(trained):
    from cpldm_core.denoiser import ConfounderAwareDenoiser
    from cpldm_core.diffusion import make_scheduler
    from pipelines import train

    lake, truth, cfg, _ = trained
    model = train.load_model(lake, "scm")
    state = train.load_checkpoint_state(lake, "scm")
    assert state["step"] == 40
    ref = ConfounderAwareDenoiser.from_config_dict(json.loads(lake.read_bytes("models/scm/final/config.json")))
    ref.load_state_dict(state["ema"])           # the export is the EMA model of the last checkpoint
    ref.eval()
    vocab = model.vocab
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    c = torch.randn(3, EMB_DIM, generator=g)
    conf = vocab.encode(["source_1", "source_1", "source_2"], ["b1", "b2", "b3"], ["A01", "B01", "C03"])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c, confounders=conf), ref(x, t, c, confounders=conf), rtol=0, atol=0)
    assert model.metadata["schedule"]["beta_end"] == 0.0205
    assert make_scheduler("ddim", model.metadata["schedule"]).config.prediction_type == "v_prediction"
    assert tuple(model.metadata["latent_shape"]) == (8, 8, 8)


def test_a_restored_run_trains_exactly_what_an_uninterrupted_rerun_trains(trained):
    """The same config again on the same lake, without the injected failure: every logged loss and every
    weight (model, EMA, optimiser moments) must be bit-identical to the run that lost a worker at step 15 and
    was restored from its step-10 checkpoint. Fails if the data order, the noise or the dropout draws depend
    on Ray Data's scheduling, on the restart or on wall-clock randomness."""
    from pipelines import train

    lake, _, cfg, _ = trained
    again = train.run(lake, dataclasses.replace(cfg, fail_at_step=-1), run="scm-again")
    assert again["restored_from"] == -1
    hist = {r: train.read_history(lake, r).sort_values(["step", "split"]).reset_index(drop=True)
            for r in ("scm", "scm-again")}
    assert hist["scm"]["loss"].tolist() == hist["scm-again"]["loss"].tolist()
    assert hist["scm"]["epoch"].tolist() == hist["scm-again"]["epoch"].tolist()
    a, b = (train.load_checkpoint_state(lake, r) for r in ("scm", "scm-again"))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"
    moments = [(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(),
                                                            b["optimizer"]["state"].values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)
    rows = [set(lake.read_json(f"models/{r}/audit/rank-1.json")["rows"]) for r in ("scm", "scm-again")]
    assert rows[0] <= rows[1]   # the restored rank saw only steps 11-40 of what the rerun's rank 1 saw


def test_scm_free_on_s3_and_resume(ray_cluster, s3_lake):
    from cpldm_core.errors import UserError
    from pipelines import train

    # 4x4 latents, while the tiny U-Net preset says 8: the model must record the side it was trained on
    write_training_lake(s3_lake, size=4)
    # with the global condition (timestep-embedding path): its weights must train, export and resume too
    cfg = train.load_train_config("tiny", overrides={**TINY, "max_steps": 4, "checkpoint_every": 2,
                                                     "val_every": 0, "global_condition": True}, model="scm-free")
    summary = train.run(s3_lake, cfg, run="free")
    assert summary["steps"] == 4 and summary["model"] == "scm-free"
    model = train.load_model(s3_lake, "free")
    assert model.kind == "scm-free" and model.confounder_embed is None and model.global_condition
    assert model.unet.config.sample_size == 4 and tuple(model.metadata["latent_shape"]) == (8, 4, 4)
    from pipelines.generate import resolve_model
    assert resolve_model(s3_lake, "free").latent_shape == (8, 4, 4)   # generation samples what was trained
    with pytest.raises(UserError, match="--resume"):
        train.run(s3_lake, cfg, run="free")
    # the ModelCard: what generation reads, linked to the LatentCache record of the latents it trained on
    from storage_schemas.artifacts import LatentCache, read_artifact
    card = train.read_model_card(s3_lake, "free")
    assert (card.model_kind, card.confounders, card.latent_shape, card.steps_done) == ("scm-free", (), (8, 4, 4), 4)
    assert card.inputs["latents"] == read_artifact(s3_lake, LatentCache, VAE_ID).ref()
    assert card.encoder_id == ENCODER_ID and card.vocabulary["batches"] == ("b1", "b2", "b3")
    # --resume with a changed science field is refused before any step; max_steps (when to stop) may change
    other_lr = train.load_train_config("tiny", overrides={**TINY, "max_steps": 6, "checkpoint_every": 2,
                                                          "val_every": 0, "lr": 1.2345e-4,
                                                          "global_condition": True}, model="scm-free")
    with pytest.raises(UserError, match=r"--resume: run 'free' was trained with other .*\(config\.lr differ\)"):
        train.run(s3_lake, other_lr, run="free", resume=True)
    longer = train.load_train_config("tiny", overrides={**TINY, "max_steps": 6, "checkpoint_every": 2,
                                                        "val_every": 0, "global_condition": True}, model="scm-free")
    # a card written before two TrainConfig keys existed (as an older cpldm wrote it): the key left at its
    # default (compound_feature_dropout 0) counts as equal, the one set otherwise (global_condition) differs
    from dataclasses import replace
    from storage_schemas.artifacts import write_record
    old_config = {k: v for k, v in card.config.items() if k not in ("compound_feature_dropout", "global_condition")}
    write_record(s3_lake, "models/free", replace(card, config=old_config))
    with pytest.raises(UserError, match=r"\(config\.global_condition differ\)"):
        train.run(s3_lake, longer, run="free", resume=True)
    old_config["global_condition"] = True
    write_record(s3_lake, "models/free", replace(card, config=old_config))
    old_fingerprint = train.read_model_card(s3_lake, "free").fingerprint
    resumed = train.run(s3_lake, longer, run="free", resume=True)
    assert resumed["restored_from"] == 4 and resumed["steps"] == 6
    # the card keeps the config it was written with: generation runs that name it as input still match
    assert train.read_model_card(s3_lake, "free").fingerprint == old_fingerprint
    steps = train.read_history(s3_lake, "free").query("split == 'train'")["step"].tolist()
    assert steps == list(range(1, 7))
    assert train.read_model_card(s3_lake, "free").steps_done == 6
