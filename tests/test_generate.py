"""``cpldm generate`` end to end on a toy lake (random-weight tiny U-Net and VAE of the real classes).

Checks: output shape/dtype and row bookkeeping (design == manifest, no gaps or duplicates); the draws come from the
support recorded with the model, shared by every compound, with dmso_per_draw DMSO images per draw; same seeds
give the same images (across runs, lakes, Ray vs in-process, 1 vs 2 actors); a run killed midway and rerun
equals an uninterrupted run; changing only the batch token changes an scm image (and not an scm-free one);
classifier-free guidance; TIFF export.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest

from tests._fixtures import BATCHES, TOY_ENCODER, TOY_VAE, WELLS, build_toy_lake, toy_model_card
from cpldm_core.design import GenerateConfig
from cpldm_core.errors import UserError
from pipelines import generate
from pipelines.storage import Lake
from storage_schemas.artifacts import LatentCache, ModelCard, read_artifact, write_record

SIDE = 32  # px: tiny U-Net at 4x4 latents, VAE 8x


def config(**kw) -> GenerateConfig:
    base = dict(model_run="scm", draws=3, compounds="all", sampler="dpm++", steps=4, block_size=4, batch_size=4,
                design_part_rows=8, seed_namespace="shared-ns", dmso_per_draw=2)
    return GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    lake = Lake(str(tmp_path_factory.mktemp("gen") / "lake"))
    lake.init()
    info = build_toy_lake(lake, n_compounds=6)
    return lake, info


@pytest.fixture(scope="module")
def reference(toy):
    """An uninterrupted in-process run (namespace shared-ns): images and manifest."""
    lake, _ = toy
    cfg = config(run="reference", export_tiff=True)
    summary = generate.run(lake, cfg, use_ray=False)
    return summary, generate.open_images(lake, "reference")[:], generate.read_manifest(lake, "reference")


def test_outputs_shape_dtype_and_row_bookkeeping(toy, reference):
    lake, info = toy
    summary, images, manifest = reference
    n = (len(info["compounds"]) - 1) * 3 + 3 * 2       # treatments x 3 draws + 3 draws x 2 DMSO images
    assert summary["images"] == n and summary["images_generated_now"] == n and summary["rejected_compounds"] == 0
    assert images.shape == (n, 5, SIDE, SIDE) and images.dtype == np.uint16
    arr = generate.open_images(lake, "reference")
    assert arr.chunks == (1, 5, SIDE, SIDE)          # one chunk per image
    # every image was written (the fill value 0 is below the normalisation's low grey levels), not constant
    low = np.array(lake.read_json("latents/toy-vae/normalisation.json")["low"])
    assert (images.reshape(n, 5, -1).min(axis=2) >= low.astype(np.uint16)).all()
    assert (images.reshape(n, -1).std(axis=1) > 0).all()
    # manifest: one row per image, rows 0..n-1 exactly once, matching the design table row for row
    assert manifest["Metadata_ImageRow"].tolist() == list(range(n))
    design = lake.read_table("synthetic_design/run=reference").to_pandas().sort_values("Metadata_DesignRow")
    keys = ["Metadata_DesignRow", "Metadata_JCP2022", "Metadata_Draw", "Metadata_Replicate", "Metadata_Source",
            "Metadata_Batch", "Metadata_Well", "Metadata_Seed"]
    pd.testing.assert_frame_equal(design[keys].reset_index(drop=True), manifest[keys].reset_index(drop=True),
                                  check_dtype=False)
    assert set(manifest["Metadata_Model"]) == {"scm"} and set(manifest["Metadata_ModelKind"]) == {"scm"}
    assert set(manifest["Metadata_Sampler"]) == {"dpm++"} and set(manifest["Metadata_SamplerSteps"]) == {4}
    # drawn confounders are in the support recorded with the model; one (seed, batch, well) per draw
    support = lake.read_table("confounder_support/model=scm").to_pandas()
    allowed = set(zip(support["Metadata_Source"], support["Metadata_Batch"], support["Metadata_Well"]))
    assert set(zip(manifest["Metadata_Source"], manifest["Metadata_Batch"], manifest["Metadata_Well"])) <= allowed
    first = manifest[manifest["Metadata_Replicate"] == 0]
    assert (first.groupby("Metadata_Draw")[["Metadata_Seed", "Metadata_Batch", "Metadata_Well"]].nunique()
            .to_numpy() == 1).all()
    dmso = manifest[manifest["Metadata_JCP2022"] == info["compounds"][0]]
    assert dmso.groupby("Metadata_Draw").size().tolist() == [2, 2, 2]
    record = lake.read_json("synthetic/reference/config.json")["generation"]
    assert (record["model_run"], record["model_kind"], record["draws"], record["sampler"], record["steps"]) == \
        ("scm", "scm", 3, "dpm++", 4)
    assert record["compounds"] == "all" and record["guidance_scale"] == 1.0
    assert (record["support"], record["shared_draws"], record["dmso_per_draw"], record["oracle"]) == \
        ("joint", True, 2, None)


def test_tiff_export_matches_zarr_in_jump_layout(toy, reference):
    import tifffile

    lake, _ = toy
    _, images, manifest = reference
    load_data = pd.concat([pd.read_csv(io.BytesIO(lake.read_bytes(p)))
                           for p in lake.ls("synthetic/reference/tiff/load_data_csv")], ignore_index=True)
    assert sorted(load_data["Metadata_ImageRow"]) == manifest["Metadata_ImageRow"].tolist()
    row = load_data.iloc[5]
    assert f"/{row.Metadata_Source}/images/{row.Metadata_Batch}/images/{row.Metadata_JCP2022}/Images/" in row.URL_OrigAGP
    agp = tifffile.imread(io.BytesIO(open(row.URL_OrigAGP, "rb").read()))
    np.testing.assert_array_equal(agp, images[row.Metadata_ImageRow, 3])
    assert generate.tiff_name("B03", 2, 4) == "r02c03f02p01-ch4sk1fk1fl1.tiff"
    assert generate.tiff_name("AF48", 1, 1) == "r32c48f01p01-ch1sk1fk1fl1.tiff"


def test_killed_run_resumes_to_the_uninterrupted_result(toy, reference, monkeypatch):
    lake, _ = toy
    _, ref_images, ref_manifest = reference
    cfg = config(run="resumed")
    # 1) stopped after one block
    first = generate.run(lake, cfg, use_ray=False, max_blocks=1)
    assert first["images_generated_now"] == 4
    # 2) killed in the middle of block 2: its rows are half-written garbage and it has a stale manifest part
    real_call = generate.BlockGenerator.__call__

    def dying(self, block):
        if block == 2:
            rows = self.job.spec.block_rows(block)
            self._array()[rows.start:rows.start + 2] = 7
            generate.write_manifest(self.lake, self.job, block, self.job.spec.block(block).head(2))
            raise RuntimeError("killed")
        return real_call(self, block)

    monkeypatch.setattr(generate.BlockGenerator, "__call__", dying)
    with pytest.raises(RuntimeError, match="killed"):
        generate.run(lake, cfg, use_ray=False)
    monkeypatch.setattr(generate.BlockGenerator, "__call__", real_call)
    done = lake.committed_units(generate.block_stage("resumed"))
    assert done == {"block-000000", "block-000001"}
    # 3) rerun: only the uncommitted blocks are redone, and the result equals the uninterrupted run
    final = generate.run(lake, cfg, use_ray=False)
    assert final["blocks_done_now"] == final["blocks"] - 2
    np.testing.assert_array_equal(generate.open_images(lake, "resumed")[:], ref_images)
    manifest = generate.read_manifest(lake, "resumed")
    assert manifest["Metadata_ImageRow"].tolist() == ref_manifest["Metadata_ImageRow"].tolist()
    pd.testing.assert_frame_equal(manifest, ref_manifest)
    # a finished run reruns as a no-op
    assert generate.run(lake, cfg, use_ray=False)["blocks_done_now"] == 0
    # resuming with different settings is refused instead of mixing two designs
    with pytest.raises(UserError, match="different"):
        generate.run(lake, config(run="resumed", steps=5), use_ray=False)


def test_only_the_batch_token_changes_an_scm_image(toy):
    lake, info = toy
    for kind in ("scm", "scm-free"):
        job, _ = generate.plan(lake, config(model_run=kind, run=f"tokens-{kind}"))
        worker = generate.BlockGenerator(lake, job)
        row = job.spec.block(0).iloc[[0]]
        other = next(b for s, b in BATCHES if b != row["Metadata_Batch"].iloc[0])
        twin = row.assign(Metadata_Batch=other, Metadata_Source=dict((b, s) for s, b in BATCHES)[other])
        same_a, same_b, changed = (worker.generate(f) for f in (row, row.copy(), twin))
        np.testing.assert_array_equal(same_a, same_b)               # nothing changed: same image
        if kind == "scm":
            assert np.abs(changed.astype(int) - same_a.astype(int)).max() > 0
        else:                                                       # scm-free ignores confounders
            np.testing.assert_array_equal(changed, same_a)
        # a different seed changes the image in both models
        reseeded = worker.generate(row.assign(Metadata_Seed=row["Metadata_Seed"] + 1))
        assert np.abs(reseeded.astype(int) - same_a.astype(int)).max() > 0


def test_compound_file_unknown_ids_are_rejected_and_counted(toy, tmp_path):
    lake, info = toy
    path = tmp_path / "ids.txt"
    path.write_text("\n".join([info["compounds"][1], info["compounds"][2], "JCP2022_999999"]) + "\n")
    summary = generate.run(lake, config(run="from-file", compounds=str(path), draws=2), use_ray=False, max_blocks=0)
    assert summary["compounds"] == 3            # two listed + DMSO (include_negcon)
    assert summary["rejected_compounds"] == 1 and summary["images"] == 2 * 2 + 2 * 2
    rejects = lake.read_table("rejects/stage=generate").to_pandas()
    assert rejects["item"].tolist() == ["JCP2022_999999"] and TOY_ENCODER in rejects["reason"].iloc[0]
    with pytest.raises(UserError, match="no such file"):
        generate.run(lake, config(run="x", compounds=str(tmp_path / "missing.txt")), use_ray=False)
    with pytest.raises(UserError, match="no trained model"):
        generate.run(lake, config(run="x", model_run="nope"), use_ray=False)


def test_cli_ray_actors_on_s3_give_the_same_images(s3_lake, ray_cluster, toy, reference):
    """Two Ray actors on an S3 lake, through the command line, reproduce the local in-process run."""
    from pipelines.cli import main

    build_toy_lake(s3_lake, kinds=("scm",), n_compounds=6)
    code = main(["--lake", s3_lake.uri, "--endpoint-url", s3_lake.endpoint_url, "generate", "--preset", "tiny",
                 "--model-run", "scm", "--draws", "3", "--run", "ray-s3", "--seed-namespace", "shared-ns",
                 "--sampler", "dpm++", "--steps", "4", "--actors", "2", "--dmso-per-draw", "2",
                 "--set", "block_size=4", "--set", "batch_size=4", "--set", "design_part_rows=8"])
    assert code == 0
    _, ref_images, ref_manifest = reference
    np.testing.assert_array_equal(generate.open_images(s3_lake, "ray-s3")[:], ref_images)
    manifest = generate.read_manifest(s3_lake, "ray-s3")
    pd.testing.assert_frame_equal(manifest.drop(columns="run", errors="ignore"),
                                  ref_manifest.drop(columns="run", errors="ignore"))


def test_generation_samples_at_the_trained_latent_side_not_the_preset_side(tmp_path):
    """A model whose U-Net preset says 8x8 latents but which was trained on 4x4 ones (its ModelCard's
    latent_shape, as ``cpldm train`` records it) generates 32 px images, the size of its training crops: the card
    decides, never the U-Net's own sample_size."""
    from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
    from cpldm_core.diffusion import ScheduleConfig

    lake = Lake(str(tmp_path / "lake"))
    lake.init()
    build_toy_lake(lake, kinds=("scm",), n_compounds=3)
    vocab = ConfounderVocab.fit([s for s, _ in BATCHES], [b for _, b in BATCHES], WELLS)
    base = {"schedule": ScheduleConfig().to_dict(), "vae_id": TOY_VAE, "encoder_id": TOY_ENCODER}
    for run, metadata in (("trained-4", {**base, "latent_shape": [8, 4, 4]}), ("preset-8", base)):
        model = ConfounderAwareDenoiser(unet="tiny", kind="scm", vocab=vocab, compound_dim=16, metadata=metadata)
        assert model.unet.config.sample_size == 8
        model.save_pretrained(tmp_path / run)
        for f in sorted((tmp_path / run).iterdir()):
            lake.write_bytes(f"models/{run}/final/{f.name}", f.read_bytes())
        lake.write_bytes(f"confounder_support/model={run}/support.parquet",
                         lake.read_bytes("confounder_support/model=scm/support.parquet"))
        # the ModelCard records the side trained on (train writes it from the LatentCache record)
        side = int(run.rsplit("-", 1)[1])
        write_record(lake, f"models/{run}", toy_model_card(run, read_artifact(lake, LatentCache, TOY_VAE).ref(),
                                                           vocab, side, kind="scm"))
    assert generate.resolve_model(lake, "trained-4").latent_shape == (8, 4, 4)
    assert generate.resolve_model(lake, "preset-8").latent_shape == (8, 8, 8)
    generate.run(lake, config(model_run="trained-4", draws=1, steps=2), use_ray=False)
    assert generate.open_images(lake, "trained-4-N1").shape[-2:] == (SIDE, SIDE)



def test_a_model_without_recorded_support_is_refused(toy):
    lake, _ = toy
    for f in ("config.json", "vocab.json", "weights.pt"):
        if lake.exists(f"models/scm/final/{f}"):
            lake.write_bytes(f"models/old/final/{f}", lake.read_bytes(f"models/scm/final/{f}"))
    write_record(lake, "models/old", dataclasses.replace(read_artifact(lake, ModelCard, "scm"), id="old"))
    with pytest.raises(UserError, match="no recorded confounder support"):
        generate.run(lake, config(model_run="old", run="old-N3"), use_ray=False, max_blocks=0)


@pytest.mark.parametrize("kind", ["scm", "scm-free"])
def test_guidance_scale_on_the_compound_condition(toy, kind):
    """s = 1 is the plain conditional sampler (the guided code path at s -> 1 gives the same latents); s > 1
    differs and, for one deterministic DDIM step (affine in v), moves along (cond - uncond):
    x(s) = x(0) + s (x(1) - x(0)), where s = 0 is the null-compound (unconditional) sample."""
    import torch

    from cpldm_core.diffusion import make_scheduler, sample

    lake, info = toy
    job, _ = generate.plan(lake, config(model_run=kind, run=f"guid-{kind}"))
    worker = generate.BlockGenerator(lake, job)
    design = job.spec.block(0)
    idx = torch.as_tensor([worker.compound_row[c] for c in design["Metadata_JCP2022"]])
    conf = (worker.vocab.encode(design["Metadata_Source"].tolist(), design["Metadata_Batch"].tolist(),
                                design["Metadata_Well"].tolist()) if kind == "scm" else None)
    seeds = design["Metadata_Seed"].tolist()

    def latents(scale, steps=4, sampler="dpm++"):
        return sample(worker.model, make_scheduler(sampler), steps, scale, worker.compound[idx], None, conf,
                      seeds=seeds, latent_shape=job.model.latent_shape)

    plain = latents(1.0)
    torch.testing.assert_close(latents(1.0 + 1e-7), plain, rtol=1e-4, atol=1e-4)
    assert (latents(3.0) - plain).abs().max() > 1e-3
    x0, x1, x3 = (latents(s, steps=1, sampler="ddim") for s in (0.0, 1.0, 3.0))
    torch.testing.assert_close(x3, x0 + 3.0 * (x1 - x0), rtol=1e-4, atol=1e-4)
    # end to end: a guided run records its scale and its images differ from the unguided reference
    guided = generate.run(lake, config(model_run=kind, guidance_scale=2.5, run=f"g-{kind}"), use_ray=False,
                          max_blocks=1)
    assert guided["guidance_scale"] == 2.5
    manifest = generate.read_manifest(lake, f"g-{kind}")
    assert set(manifest["Metadata_GuidanceScale"]) == {2.5}
    assert lake.read_json(f"synthetic/g-{kind}/config.json")["generation"]["guidance_scale"] == 2.5
    with pytest.raises(UserError, match="guidance_scale"):
        config(guidance_scale=float("nan"))


# ---------------------------------------------------------------------------------------------- oracle
ORACLE_CROP = 32


@pytest.fixture(scope="module")
def oracle_lake(tmp_path_factory):
    """A lake holding what the oracle reads: a tiny simulated world (raw/simulation.json), its sites (one row per
    used well, as the catalog lists them), split tables and an ingest record (normalisation, 32 px centre crop)."""
    import pyarrow as pa

    from cpldm_core.simulate.config import simulation_config
    from cpldm_core.simulate.world import build_world
    from pipelines.simulate import write_metadata

    lake = Lake(str(tmp_path_factory.mktemp("oracle") / "lake"))
    lake.init()
    world = build_world(simulation_config("tiny"))
    write_metadata(lake, world)
    wells = world.wells[["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well",
                         "Metadata_JCP2022"]].astype(str)
    sites = wells.assign(Metadata_SiteKey=[f"k{i}" for i in range(len(wells))], Metadata_Site=1)
    batches = sorted(set(zip(sites["Metadata_Source"], sites["Metadata_Batch"])))
    heldout = {b for k, (_, b) in enumerate(batches) if k % 3 == 2}
    compounds = sorted(set(sites["Metadata_JCP2022"]))
    lake.write_named("split_batches", pa.table({"Metadata_Source": [s for s, _ in batches],
                                                "Metadata_Batch": [b for _, b in batches],
                                                "Metadata_BatchSplit": ["heldout" if b in heldout else "train"
                                                                        for _, b in batches]}))
    lake.write_named("split_compounds", pa.table({"Metadata_JCP2022": compounds, "Metadata_CompoundSplit":
                                                  ["unseen" if k % 4 == 3 else "seen" for k in range(len(compounds))]}))
    norm = {"method": "global-per-channel-robust-percentile", "low": [300.0, 250.0, 200.0, 220.0, 180.0],
            "high": [30000.0, 25000.0, 26000.0, 24000.0, 20000.0]}
    lake.write_json("latents/sim-vae/normalisation.json", norm)
    # the oracle takes the crop from the cache's LatentCache record, as ingest writes it
    write_record(lake, "latents/sim-vae", LatentCache(id="sim-vae", inputs={}, vae_id="sim-vae", crop_mode="centre",
                                                      crop_size=ORACLE_CROP, tile_grid=2))
    return lake, world, sites, heldout, norm


def _oracle_config(**kw) -> GenerateConfig:
    return GenerateConfig(**{**dict(draws=2, compounds="all", block_size=16, design_part_rows=64, dmso_per_draw=2),
                             **kw})


def test_oracle_renders_the_simulators_image_for_each_manifest_row(oracle_lake, monkeypatch):
    from cpldm_core.simulate.oracle import render_condition

    lake, world, sites, heldout, norm = oracle_lake
    # the oracle reads the catalog's sites table; in this lake it is the world's wells
    monkeypatch.setattr(generate, "oracle_inputs", lambda _lake: (
        sites, {b for b in sites["Metadata_Batch"] if b not in heldout},
        set(lake.read_named("split_compounds").to_pandas().query("Metadata_CompoundSplit == 'seen'")
            ["Metadata_JCP2022"])))
    summary = generate.run(lake, _oracle_config(oracle="c-aware", compounds="seen"), use_ray=False)
    assert summary["run"] == "oracle-c-aware-N2" and summary["model_kind"] == "oracle-c-aware"
    record = lake.read_json("synthetic/oracle-c-aware-N2/config.json")["generation"]
    assert (record["oracle"], record["model_kind"], record["draws"], record["image_shape"]) == \
        ("c-aware", "oracle-c-aware", 2, [5, ORACLE_CROP, ORACLE_CROP])
    images = generate.open_images(lake, "oracle-c-aware-N2")[:]
    manifest = generate.read_manifest(lake, "oracle-c-aware-N2")
    assert images.shape == (summary["images"], 5, ORACLE_CROP, ORACLE_CROP) and images.dtype == np.uint16
    # reference: the simulator's site, ingest's normalisation to [-1, 1] and centre crop, stored as denormalised
    low, high = np.array(norm["low"])[:, None, None], np.array(norm["high"])[:, None, None]
    for row in manifest.iloc[[0, 5, len(manifest) - 1]].itertuples():
        raw = render_condition(world, row.Metadata_JCP2022, row.Metadata_Source, row.Metadata_Batch,
                               row.Metadata_Well, np.random.default_rng(row.Metadata_Seed)).astype(np.float32)
        x = np.clip(2 * (raw - low.astype(np.float32)) / (high - low).astype(np.float32) - 1, -1, 1)
        top = (raw.shape[-1] - ORACLE_CROP) // 2
        x = x[:, top:top + ORACLE_CROP, top:top + ORACLE_CROP]
        ref = np.clip(np.rint((x + 1) / 2 * (high - low) + low), 0, 65535).astype(np.uint16)
        np.testing.assert_array_equal(images[row.Metadata_ImageRow], ref)
    # c-aware: confounders from the training support only (seen compounds x training batches, no DMSO-only well)
    train = sites[~sites["Metadata_Batch"].isin(heldout)]
    seen = set(manifest["Metadata_JCP2022"]) - {cols_dmso()}
    trt = train[train["Metadata_JCP2022"].isin(seen)]
    support = set(zip(trt["Metadata_Source"], trt["Metadata_Batch"], trt["Metadata_Well"]))
    assert set(zip(manifest["Metadata_Source"], manifest["Metadata_Batch"], manifest["Metadata_Well"])) <= support

    # scm-free: each compound only under its own observed (source, batch, well)
    generate.run(lake, _oracle_config(oracle="scm-free", compounds="all", draws=3), use_ray=False)
    free = generate.read_manifest(lake, "oracle-scm-free-N3")
    unseen = set(lake.read_named("split_compounds").to_pandas().query("Metadata_CompoundSplit == 'unseen'")
                 ["Metadata_JCP2022"])
    for compound, rows in free.groupby("Metadata_JCP2022"):
        plated = sites[sites["Metadata_JCP2022"] == compound]
        if compound not in unseen:
            plated = plated[~plated["Metadata_Batch"].isin(heldout)]
        naive = set(zip(plated["Metadata_Source"], plated["Metadata_Batch"], plated["Metadata_Well"]))
        assert set(zip(rows["Metadata_Source"], rows["Metadata_Batch"], rows["Metadata_Well"])) <= naive, compound


def test_oracle_vae_passes_each_oracle_crop_through_the_caches_vae(oracle_lake, monkeypatch, tmp_path):
    """``--oracle-vae``: every image is the plain oracle's crop encoded by the latent cache's VAE (posterior
    mode, float16 as ingest caches it) and decoded, i.e. what a perfect latent generator would decode; evaluate
    names it ``oracle-c-aware-vae-N<draws>``."""
    import shutil

    import torch

    from cpldm_core.autoencoder import ChannelGroupAutoencoder, build_vae
    from pipelines.evaluate import synthetic_data_type
    from storage_schemas.artifacts import VaeModel

    base, world, sites, heldout, norm = oracle_lake
    shutil.copytree(base.uri, tmp_path / "lake")      # the module's lake stays a lake without a VAE
    lake = Lake(str(tmp_path / "lake"))
    torch.manual_seed(3)
    vae_dir = tmp_path / "vae"
    build_vae("tiny", sample_size=ORACLE_CROP).save_pretrained(vae_dir)
    for f in sorted(vae_dir.iterdir()):
        lake.write_bytes(f"vae/sim-vae/{f.name}", f.read_bytes())
    vae_rec = VaeModel(id="sim-vae", inputs={}, origin="external", architecture="tiny", config={})
    write_record(lake, "vae/sim-vae", vae_rec)
    groups = ((0, 1, 2), (2, 3, 4))
    write_record(lake, "latents/sim-vae", LatentCache(
        id="sim-vae", inputs={"vae": vae_rec.ref()}, vae_id="sim-vae", vae_location="lake:vae/sim-vae",
        channel_groups=groups, crop_mode="centre", crop_size=ORACLE_CROP, tile_grid=2))
    lake.write_json("latents/sim-vae/config.json", {"vae_source": {"vae_id": "sim-vae", "kind": "lake",
                                                                   "path": "vae/sim-vae", "subfolder": None}})
    monkeypatch.setattr(generate, "oracle_inputs", lambda _lake: (
        sites, {b for b in sites["Metadata_Batch"] if b not in heldout},
        set(lake.read_named("split_compounds").to_pandas().query("Metadata_CompoundSplit == 'seen'")
            ["Metadata_JCP2022"])))
    cfg = _oracle_config(oracle="c-aware", compounds="seen", seed_namespace="same-draws")
    generate.run(lake, dataclasses.replace(cfg, run="plain"), use_ray=False)
    summary = generate.run(lake, dataclasses.replace(cfg, oracle_vae=True), use_ray=False)
    assert summary["run"] == "oracle-c-aware-vae-N2"
    assert synthetic_data_type(lake, "oracle-c-aware-vae-N2") == "oracle-c-aware-vae-N2"
    assert synthetic_data_type(lake, "plain") == "oracle-c-aware-N2"
    plain = generate.open_images(lake, "plain")[:]
    through = generate.open_images(lake, "oracle-c-aware-vae-N2")[:]
    assert (generate.read_manifest(lake, "oracle-c-aware-vae-N2")["Metadata_Seed"].to_numpy()
            == generate.read_manifest(lake, "plain")["Metadata_Seed"].to_numpy()).all()
    # reference: the plain oracle's stored image back to [-1, 1] is not exact (uint16 rounding), so re-render
    # the crop, then the VAE by hand: float16 latents of the mode, decode, the generate store rule
    model = ChannelGroupAutoencoder.from_pretrained(str(vae_dir), groups=groups, local_files_only=True)
    low, high = np.array(norm["low"])[:, None, None], np.array(norm["high"])[:, None, None]
    manifest = generate.read_manifest(lake, "oracle-c-aware-vae-N2")
    for row in manifest.iloc[[0, 7, len(manifest) - 1]].itertuples():
        x = generate.oracle_crop(world, row.Metadata_JCP2022, row.Metadata_Source, row.Metadata_Batch,
                                 row.Metadata_Well, row.Metadata_Seed, norm, ("centre", ORACLE_CROP, 2))
        with torch.no_grad():
            z = (model.vae.encode(torch.from_numpy(x[None, [0, 1, 2]])).latent_dist.mode(),
                 model.vae.encode(torch.from_numpy(x[None, [2, 3, 4]])).latent_dist.mode())
            z = [(zi * model.scaling_factor).numpy().astype(np.float16).astype(np.float32) for zi in z]
            a, b = (model.vae.decode(torch.from_numpy(zi) / model.scaling_factor).sample[0].numpy() for zi in z)
        rec = np.stack([a[0], a[1], (a[2] + b[0]) / 2, b[1], b[2]]).clip(-1, 1)
        ref = np.clip(np.rint((rec + 1) / 2 * (high - low) + low), 0, 65535).astype(np.uint16)
        got = through[row.Metadata_ImageRow].astype(np.int64)
        # batched vs single-image convolutions differ in float32 rounding, which can flip a float16 latent by
        # one ulp: a few grey levels of ~25,000 at most, half a grey level on average
        assert np.abs(got - ref).max() <= 16 and np.abs(got - ref).mean() < 0.5, row
        assert np.abs(got - plain[row.Metadata_ImageRow]).mean() > 500    # a random VAE changes the image
    with pytest.raises(UserError, match="oracle_vae"):
        GenerateConfig(oracle_vae=True)


def cols_dmso() -> str:
    from storage_schemas.columns import DMSO_JCP2022
    return DMSO_JCP2022


def test_each_draw_is_a_plate_with_its_own_dmso_wells_in_profile(toy, reference):
    """``cpldm profile`` lists a synthetic image under plate ``draw-000i``; the dmso_per_draw DMSO images of a
    draw stay distinct well rows (Metadata_Draw = draw + N * replicate), so each plate has 2 controls here."""
    from cpldm_core.features.aggregate import WELL_KEYS
    from pipelines.profile import synthetic_items

    lake, info = toy
    _, _, manifest = reference
    items = synthetic_items(lake, "reference")
    assert (items["Metadata_Plate"] == [f"draw-{d:04d}" for d in manifest["Metadata_Draw"]]).all()
    assert not items.duplicated([k for k in WELL_KEYS]).any()          # one well row per image
    controls = items[items["Metadata_pert_type"] == "negcon"]
    assert controls.groupby("Metadata_Plate").size().tolist() == [2, 2, 2]
    assert ((controls["Metadata_Draw"] % 3).to_numpy() == manifest.loc[controls.index, "Metadata_Draw"]).all()


def test_a_second_run_leaves_the_blocks_a_live_run_holds(toy, reference):
    """Two runs of one ``--run``: the second starts while the first (a live process) holds blocks 1 and 3 and has
    half-written block 3. It does every other block and leaves those two alone. The first run is then killed
    and a rerun takes its blocks over: the result equals the uninterrupted run and no block is done twice."""
    import subprocess

    import zarr

    from tests._fixtures import hold_claim

    lake, _ = toy
    _, ref_images, ref_manifest = reference
    cfg = config(run="concurrent")
    stage = generate.block_stage("concurrent")
    other = subprocess.Popen(["sleep", "300"])  # the first run's process: alive, on this host
    try:
        generate.run(lake, cfg, use_ray=False, max_blocks=0)   # it wrote the design and created the array ...
        held = {generate.block_unit(1), generate.block_unit(3)}
        for unit in held:                                         # ... and holds blocks 1 and 3
            hold_claim(lake, stage, unit, other.pid)
        images = zarr.open_array(lake.zarr_store(generate.images_path("concurrent")), path=generate.IMAGES_ARRAY,
                                 mode="r+")
        images[12:14] = 7                                         # block 3 (rows 12-15) half-written
        second = generate.run(lake, cfg, use_ray=False)
        all_blocks = {generate.block_unit(b) for b in range(second["blocks"])}
        assert lake.committed_units(stage) == all_blocks - held
        assert (images[12:14] == 7).all()                          # the held block was not touched
        assert (second["blocks_done_now"], second["blocks_busy"]) == (second["blocks"] - 2, 2)
        assert sorted(p.rsplit("/", 1)[-1] for p in lake.ls(f"_claims/{stage}")) == sorted(f"{u}.json" for u in held)
        stamps = {u: lake.unit_info(stage, u)["time"] for u in all_blocks - held}
    finally:
        other.kill()
        other.wait()
    resumed = generate.run(lake, cfg, use_ray=False)   # the first run died: its claims are taken over
    assert (resumed["blocks_done_now"], resumed["blocks_busy"]) == (2, 0)
    assert {u: lake.unit_info(stage, u)["time"] for u in stamps} == stamps   # no block done twice
    np.testing.assert_array_equal(generate.open_images(lake, "concurrent")[:], ref_images)
    pd.testing.assert_frame_equal(generate.read_manifest(lake, "concurrent"), ref_manifest)
