"""`cpldm demo --preset tiny` end to end: every stage's outputs exist, validate against their schemas, reconcile
their counts, and the evaluation has a row for every data type x task x split. A rerun skips every step."""
import pandas as pd

from pipelines import demo
from pipelines.evaluate import KIND_NAMES
from pipelines.lake_commands import table_files, validate_lake
from pipelines.storage import Lake


def test_tiny_demo_end_to_end(tmp_path, ray_cluster):
    lake = Lake(str(tmp_path / "lake"))
    lines = []
    out = demo.run(lake, demo.DEMO_PRESETS["tiny"], echo=lines.append)
    steps = {r["step"]: r for r in out["steps"]}
    expected = [name for name, _ in demo._steps(demo.DEMO_PRESETS["tiny"])]
    assert list(steps) == expected and not any(r["skipped"] for r in steps.values())

    # every table written by any stage validates against its schema
    assert validate_lake(lake) == {}
    for table in ("sites", "compounds", "split_compounds", "split_batches", "latent_index", "embeddings",
                  "train_history", "generation_design", "synthetic_manifest", "features_image",
                  "features_well", "features_treatment", "eval_results", "truth_compounds"):
        assert table_files(lake, table), f"{table} was not written"

    # counts reconcile: simulated sites = catalogued sites + catalog rejects; ingest sites = encoded + rejected
    simulated = steps["simulate"]["summary"]["sites_total"]
    catalogued = steps["catalog"]["summary"]
    assert simulated == catalogued["sites"] + catalogued["rejected"]
    assert lake.read_named("sites").num_rows == catalogued["sites"]
    ingest = steps["ingest"]["summary"]
    assert ingest["sites"] == ingest["encoded_sites"] + ingest["rejected"]
    index = lake.read_named("latent_index").to_pandas()
    assert index["Metadata_SiteKey"].nunique() == ingest["encoded_sites"]
    # unseen compounds never reach the latent cache used for training
    split = lake.read_named("split_compounds").to_pandas()
    unseen = set(split.loc[split["Metadata_CompoundSplit"] == "unseen", "Metadata_JCP2022"])
    assert unseen and not unseen & set(index["Metadata_JCP2022"])

    # generation: one image per design row, no gaps or duplicates
    manifest = lake.read_named("synthetic_manifest").to_pandas()
    design = lake.read_named("generation_design").to_pandas()
    for run, rows in manifest.groupby("run"):
        assert sorted(rows["Metadata_ImageRow"]) == list(range(len(rows)))
        assert len(rows) == (design["run"] == run).sum()

    # profiles: one image-level row per real site that was not rejected, per synthetic image
    images = lake.read_named("features_image").to_pandas()
    real_rejects = steps["profile-real"]["summary"]["rejected"]
    assert (images["dataset"] == "real").sum() + real_rejects == catalogued["sites"]
    for run, rows in manifest.groupby("run"):
        assert (images["dataset"] == run).sum() + steps[f"profile-{run}"]["summary"]["rejected"] == len(rows)

    # evaluation: a row for every data type x task x split, for both metrics
    results = lake.read_named("eval_results").to_pandas()
    folds = results[results["fold"] >= 0]
    cfg = demo.DEMO_PRESETS["tiny"]
    guided = f"g{cfg.guidance_scale:g}"
    data_types = ({"real", "real-harmony", "real-allwells", "chemistry-nn", "vae-recon"}
                  | {f"{kind}-N{n}" for kind in ("c-aware", "non-c-aware") for n in cfg.draws}
                  | {f"{KIND_NAMES[m]}-N{n}-{guided}" for m in cfg.guidance_models for n in cfg.guidance_draws}
                  | {f"oracle-{kind}-N{n}" for kind in ("c-aware", "scm-free") for n in cfg.oracle_draws})
    assert set(folds["data_type"]) == data_types   # the truth run is the yardstick, never a data type
    grid = folds.groupby(["data_type", "task", "query_split", "metric"]).size()
    for dt in data_types:
        for task in ("moa", "target"):
            for split_name in ("seen", "unseen"):
                for metric in ("mAP", "mAP-label", "ROC-AUC"):
                    assert grid.get((dt, task, split_name, metric), 0) > 0, (dt, task, split_name, metric)
    # truth recovery: every data type, every compound with a truth profile, nothing fitted
    truth = lake.read_named("truth_profiles").to_pandas()
    recovery = lake.read_named("eval_truth_recovery").to_pandas()
    assert set(recovery["data_type"]) == data_types
    assert set(recovery["Metadata_JCP2022"]) <= set(truth["Metadata_JCP2022"])
    assert lake.read_named("eval_verdict").num_rows > 0
    assert isinstance(out["evaluation"]["summary"], pd.DataFrame) and len(out["evaluation"]["summary"])
    assert lake.exists("eval/demo/report.html")
    assert any("MoA / target prediction" in line for line in lines)

    # a rerun skips every committed step and does no work
    again = demo.run(lake, demo.DEMO_PRESETS["tiny"], echo=lambda _: None)
    assert all(r["skipped"] for r in again["steps"])


def test_demo_overrides_reach_the_vae_fit_and_both_trainings(monkeypatch):
    """``fit_vae_set`` / ``train_set`` (the ``science`` preset's levers) change what the stages receive, on
    top of the stage presets; a bad key fails when the steps are built, naming the key."""
    import pytest

    import dataclasses

    from cpldm_core.autoencoder import FIT_VAE_PRESETS
    from cpldm_core.diffusion import TRAIN_PRESETS
    from cpldm_core.errors import UserError
    from cpldm_core.images import INGEST_PRESETS
    from pipelines import fit_vae, ingest, train

    seen = []
    monkeypatch.setattr(fit_vae, "run", lambda lake, cfg: seen.append(("fit-vae", cfg)) or {})
    monkeypatch.setattr(train, "run", lambda lake, cfg, run: seen.append((run, cfg)) or {})
    monkeypatch.setattr(ingest, "run", lambda lake, cfg: seen.append(("ingest", cfg)) or {})
    science = demo.DEMO_PRESETS["science"]
    steps = dict(demo._steps(dataclasses.replace(science, ingest_set=("crop_mode=tile", "tile_grid=2"))))
    for name in ("fit-vae", "ingest", "train-scm", "train-scm-free"):
        steps[name](None)
    got = dict(seen)
    assert (got["ingest"].crop_mode, got["ingest"].tile_grid, got["ingest"].crop_size) == \
        ("tile", 2, INGEST_PRESETS["demo"].crop_size)
    # the VAE-ceiling oracle: same draws (namespace) as the models, in the demo and science presets, not in tiny
    assert "generate-oracle-c-aware-vae-N10" in steps
    assert not any("vae-N" in name for name, _ in demo._steps(demo.DEMO_PRESETS["tiny"]))
    assert got["fit-vae"].steps == 3000 and got["fit-vae"].crop_size == FIT_VAE_PRESETS["demo"].crop_size
    for model in ("scm", "scm-free"):
        cfg = got[model]
        assert (cfg.model, cfg.max_steps, cfg.ema_decay, cfg.lr_schedule) == (model, 960, 0.99, "cosine")
        assert cfg.lr == TRAIN_PRESETS["demo"].lr and cfg.unet_preset == TRAIN_PRESETS["demo"].unet_preset
    # the demo preset itself is the stage presets, untouched
    seen.clear()
    steps = dict(demo._steps(demo.DEMO_PRESETS["demo"]))
    steps["train-scm"](None)
    assert seen[0][1].max_steps == TRAIN_PRESETS["demo"].max_steps
    with pytest.raises(UserError, match="max_stepz"):
        demo._steps(demo.DemoConfig(train_set=("max_stepz=5",)))


def test_demo_refuses_a_lake_demoed_with_other_settings(tmp_path):
    """Steps are skipped by name, so `demo --preset science` on a lake made by `--preset demo` would keep the old
    VAE and models while claiming the new recipe: refused in one line naming the fields (before any Ray work)."""
    import pytest

    from cpldm_core.errors import UserError

    lake = Lake(str(tmp_path / "lake"))
    lake.init()
    lake.write_config("demo", demo.DEMO_PRESETS["demo"])
    lake.commit_unit(demo.DEMO_STAGE, "simulate", {"seconds": 1.0})
    with pytest.raises(UserError, match=r"other fit_vae_set, train_set; use a fresh --lake"):
        demo.run(lake, demo.DEMO_PRESETS["science"], echo=lambda line: None)
    # the lake still says what made it
    assert lake.read_json("demo/config.json")["config"]["train_set"] == []
