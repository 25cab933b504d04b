"""``cpldm vae-recon`` on a tiny simulated lake (simulate -> catalog -> random tiny VAE -> ingest of the training
sites): the decoded images equal ``vae.decode`` of the cached latents (or of the crops encoded now, for sites
ingest did not encode), computed here without the stage; the sites are the real arm's evaluated wells (a naive
pandas rule); real metadata is kept (one draw per real plate); a killed run resumes to the same images; the run
is profiled like a generation run and evaluated as the data type ``vae-recon``."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from cpldm_core import images as im
from cpldm_core.autoencoder import DEFAULT_GROUPS, ChannelGroupAutoencoder
from pipelines import generate, ingest, vae_recon
from pipelines.storage import Lake
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

CROP = 32
#: one plate of each of the tiny world's four batches (one batch is held out by the catalog): seconds, not minutes
PLATES_PER_BATCH = 1


@pytest.fixture(scope="module")
def recon(tmp_path_factory, ray_cluster):
    from cpldm_core.autoencoder import build_vae
    from cpldm_core.images import IngestConfig
    from cpldm_core.load_data import CATALOG_PRESETS
    from cpldm_core.simulate.config import simulation_config
    from cpldm_core.simulate.world import build_world
    from pipelines import catalog, ingest, simulate
    from pipelines.fit_vae import register_vae

    lake = Lake(str(tmp_path_factory.mktemp("recon") / "lake"))
    lake.init()
    sim = simulation_config("tiny")
    world = build_world(sim)
    plates = pd.DataFrame([{"b": p.batch, "p": p.plate} for p in world.plates])
    simulate.run(lake, sim, plates=plates.groupby("b").head(PLATES_PER_BATCH)["p"].tolist())
    catalog.run(lake, CATALOG_PRESETS["tiny"])
    torch.manual_seed(0)
    vae = build_vae("tiny", sample_size=CROP)
    vae.register_to_config(scaling_factor=0.7)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    register_vae(lake, "tinyvae", str(folder), note="test: random tiny AutoencoderKL")
    ingest.run(lake, IngestConfig(vae="tinyvae", crop_size=CROP, stats_sites=8, rows_per_shard=4, batch_size=4))
    cfg = replace(vae_recon.PRESETS["tiny"], block_size=4, batch_size=3, actors=0)
    first = vae_recon.run(lake, cfg, max_blocks=2)           # killed after two blocks ...
    summary = vae_recon.run(lake, cfg)                       # ... and resumed
    model = ChannelGroupAutoencoder.from_pretrained(str(folder), groups=DEFAULT_GROUPS)
    return lake, model, first, summary


def test_sites_are_the_real_arms_evaluated_wells_with_real_metadata(recon):
    lake, _, first, summary = recon
    sites = lake.read_named("sites").to_pandas()
    split = lake.read_named("split_compounds").to_pandas().set_index("Metadata_JCP2022")["Metadata_CompoundSplit"]
    b = lake.read_named("split_batches").to_pandas()
    heldout = set(b.loc[b["Metadata_BatchSplit"] == "heldout", "Metadata_Batch"])
    assert heldout
    # naive rule: DMSO everywhere; unseen everywhere; seen only in held-out batches unless it has none there
    seen = sites["Metadata_JCP2022"].map(split).eq("seen")
    dmso = sites["Metadata_JCP2022"].eq(DMSO_JCP2022)
    in_heldout = sites["Metadata_Batch"].isin(heldout)
    has_heldout = sites[seen & in_heldout]["Metadata_JCP2022"].unique()
    keep = dmso | ~seen | in_heldout | ~sites["Metadata_JCP2022"].isin(has_heldout)
    expected = set(sites.loc[keep, "Metadata_SiteKey"])

    manifest = generate.read_manifest(lake, "vae-recon")
    record = lake.read_json("synthetic/vae-recon/config.json")["generation"]
    assert first["blocks_done_now"] == 2 and summary["blocks_skipped"] == 2
    assert summary["images"] == len(manifest) == len(expected) and summary["crops_encoded_now"] > 0
    assert summary["crops_from_cache"] > 0
    assert list(manifest["Metadata_ImageRow"]) == list(range(len(manifest)))
    design = lake.read_table("synthetic_design/run=vae-recon").to_pandas()
    assert list(design["Metadata_DesignRow"]) == list(manifest["Metadata_DesignRow"])
    # every row is one site's crop with the site's compound, source, batch, well; one draw per real plate
    real_plates = pd.DataFrame(record["real_plates"])
    plate_of = manifest["Metadata_Draw"].map(lambda d: real_plates.iloc[int(d)]["Metadata_Plate"])
    rebuilt = [f"{s}/{b}/{p}/{w}/1" for s, b, p, w in zip(manifest["Metadata_Source"], manifest["Metadata_Batch"],
                                                            plate_of, manifest["Metadata_Well"])]
    assert set(rebuilt) == expected and len(set(rebuilt)) == len(rebuilt)
    by_site = sites.set_index("Metadata_SiteKey")
    assert (by_site.loc[rebuilt, "Metadata_JCP2022"].to_numpy() == manifest["Metadata_JCP2022"].to_numpy()).all()


def test_images_equal_vae_decode_of_the_cached_or_freshly_encoded_latents(recon):
    lake, model, _, _ = recon
    manifest = generate.read_manifest(lake, "vae-recon")
    stored = generate.open_images(lake, "vae-recon")[:]
    norm = ingest.read_normalisation(lake, "tinyvae").to_dict()
    from pipelines.ingest import open_latents
    cache = open_latents(lake, "tinyvae", mode="r")
    record = lake.read_json("synthetic/vae-recon/config.json")["generation"]
    plates = pd.DataFrame(record["real_plates"])
    sites = lake.read_named("sites").to_pandas().set_index("Metadata_SiteKey")
    for row in manifest.itertuples(index=False):
        if row.Metadata_Seed != vae_recon.NOT_CACHED:
            z = np.asarray(cache[int(row.Metadata_Seed)], np.float32)
        else:   # not in the cache (ingest encodes training sites only): TIFFs -> normalise -> crop -> encode
            plate = plates.iloc[int(row.Metadata_Draw)]["Metadata_Plate"]
            site = sites.loc[f"{row.Metadata_Source}/{row.Metadata_Batch}/{plate}/{row.Metadata_Well}/1"]
            raw = np.stack([tifffile.imread(site[f"URL_Orig{c}"]) for c in CHANNELS]).astype(np.float32)
            x = im.centre_crop(im.normalise(raw, norm["low"], norm["high"]), CROP)
            z = model.encode(torch.from_numpy(np.ascontiguousarray(x[None])))[0].numpy().astype(np.float16)
        decoded = model.decode(torch.from_numpy(np.asarray(z, np.float32)[None])).numpy()[0]
        reference = im.denormalise(decoded, norm["low"], norm["high"])
        # batched vs single-image convolutions differ in the last float bits (and may flip a float16 rounding
        # of a fresh latent): within 1e-3 of each channel's grey range, and nearly every pixel within 1 level
        diff = np.abs(stored[row.Metadata_ImageRow].astype(np.int64) - reference.astype(np.int64))
        span = np.asarray(norm["high"]) - np.asarray(norm["low"])
        assert (diff.max(axis=(1, 2)) <= 1e-3 * span + 1).all()
        assert (diff <= 1).mean() > 0.95


def test_gallery_files_for_a_tiny_lake(recon):
    """Oracle runs stand in for the trained rows (no model in this lake): 4 rows x 2 compounds, the per-channel
    figures and the conditions figure, linked from the gallery page."""
    from cpldm_core.design import generate_preset
    from pipelines import gallery

    lake = recon[0]
    runs = {}
    for oracle in ("c-aware", "scm-free"):
        cfg = generate_preset("tiny", oracle=oracle, draws=2, seed_namespace="gallery", dmso_per_draw=2)
        runs[oracle] = generate.run(lake, cfg, use_ray=False)["run"]
    out = gallery.run(lake, gallery.GalleryConfig(run="vr", c_aware_run=runs["c-aware"], scm_free_run=runs["scm-free"],
                                                  oracle_run=runs["c-aware"], n_compounds=2))
    assert out["figures"] == 4 and out["compounds"] == 2 and out["rows"] == 4
    names = ["compounds.png", "compound-0.png", "compound-1.png", "conditions.png"]
    for name in names:
        assert lake.read_bytes(f"eval/vr/gallery/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    page = lake.read_bytes("eval/vr/gallery/README.md").decode()
    assert all(f"]({name})" in page for name in names)
    assert [rel for _, rel in gallery.gallery_figures(lake, "vr")] == [f"gallery/{n}" for n in names]


def test_profiled_and_evaluated_as_the_vae_recon_data_type(recon):
    from cpldm_core.evaluation.config import preset
    from cpldm_core.features.config import PRESETS as PROFILE
    from pipelines import evaluate, profile

    lake, _, _, summary = recon
    profile.run(lake, PROFILE["tiny"], dataset="real")
    out = profile.run(lake, PROFILE["tiny"], dataset="vae-recon")
    assert out["images"] == summary["images"] and out["rejected"] == 0
    wells = lake.read_table("features/well/dataset=vae-recon").to_pandas()
    # one well row per real well (plate = the draw of its real plate), like the real wells it reconstructs
    assert len(wells) == len(wells.drop_duplicates(["Metadata_Plate", "Metadata_Well"])) == summary["sites"]
    # real and vae-recon only (harmony, all-wells: other tests): the two data types that share the wells; four
    # plates hold few compounds per label, so labels of 2 compounds (1 reference + 1 query) count here
    result = evaluate.run(lake, preset("tiny", run="vr", concurrency=0, data_types=("real", "vae-recon"),
                                       min_compounds_moa=2, min_compounds_target=2, n_references=1))
    assert "vae-recon" in result["data_types"]
    results = lake.read_table("eval/run=vr/results.parquet").to_pandas()
    mine = results[results["data_type"] == "vae-recon"]
    assert {"mAP", "ROC-AUC"} <= set(mine["metric"])
    # the held-out rule of the real arm applies to it (the metric only real-like data types report)
    assert "seen-compounds-without-heldout-wells" in set(mine["metric"])
    # the report links the gallery written before it (test above)
    assert "gallery/conditions.png" in lake.read_bytes("eval/vr/report.html").decode()


def test_a_rerun_with_other_settings_is_refused_naming_them(recon):
    """The run directory's resume rule (`generate.write_or_refuse_run`, shared with `cpldm generate`): another
    block size would mix two layouts of the same image rows; refused in one line naming the field, the run's
    config and record untouched."""
    from cpldm_core.errors import UserError
    from pipelines.generate import run_dir

    lake = recon[0]
    cfg = replace(vae_recon.PRESETS["tiny"], block_size=4, batch_size=3, actors=0)
    before = lake.read_bytes(f"{run_dir(cfg.run)}/_artifact.json")
    with pytest.raises(UserError, match=r"already exists .* with different .*block_size"):
        vae_recon.run(lake, replace(cfg, block_size=5))
    assert lake.read_bytes(f"{run_dir(cfg.run)}/_artifact.json") == before
