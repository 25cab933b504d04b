"""`cpldm evaluate` end to end on a small lake (local and moto S3): features_well for `real` and two generation
runs, annotations, split and truth tables -> results for every data type x task x split, statistics, report;
resumability after a crash; DuckDB aggregation against pandas."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cpldm_core.errors import UserError
from cpldm_core.evaluation.config import preset
from benchmarks.bench_evaluate import write_evaluation_lake as write_world
from cpldm_core.evaluation.simulated_profiles import simulate_profiles, treatment_means
from storage_schemas.columns import DMSO_JCP2022

CFG = preset("tiny", concurrency=0)


EXPECTED_TYPES = {"real", "real-harmony", "c-aware-N3", "non-c-aware-N3"}


def _check_outputs(lake, out):
    from pipelines.evaluate import run as _  # noqa: F401  (import check)

    results = lake.read_table("eval/run=t/results.parquet").to_pandas()
    folds = results[results["fold"] >= 0]
    combos = set(map(tuple, folds[folds["metric"].isin(["mAP", "ROC-AUC"])][
        ["data_type", "task", "query_split", "metric"]].drop_duplicates().to_numpy()))
    expected = {(d, t, s, m) for d in EXPECTED_TYPES for t in ("moa", "target") for s in ("seen", "unseen")
                for m in ("mAP", "ROC-AUC")}
    assert expected <= combos
    assert (folds.groupby(["data_type", "task", "query_split", "metric"])["fold"].nunique() == CFG.n_folds).all()
    assert set(out["data_types"]) == EXPECTED_TYPES
    summary = out["summary"]
    assert len(summary) == len(EXPECTED_TYPES) * 4 and {"mAP_mean", "mAP_sd", "ROC-AUC_mean"} <= set(summary)
    # the table can be read back as a whole through the lake (nothing else lives under eval/ as Parquet)
    assert len(lake.read_named("eval_results")) == len(results)
    assert lake.exists("eval/t/report.html") and lake.exists("eval/t/figures/bars_moa.png")
    assert lake.exists("eval/t/figures/map_batch.png")
    html = lake.read_bytes("eval/t/report.html").decode()
    assert "Tukey" in html and "figures/bars_target.png" in html
    assert len(lake.read_named("eval_tukey")) > 0 and len(out["truth_recovery"]) > 0
    rec = out["truth_recovery"].set_index(["data_type", "query_split"])["mean"]
    assert rec.notna().all()
    return results


def test_evaluate_end_to_end(lake, ray_cluster):
    from pipelines import evaluate

    write_world(lake)
    cfg = replace(CFG, run="t", concurrency=2)
    out = evaluate.run(lake, cfg)
    results = _check_outputs(lake, out)
    assert out["units_done_now"] == 4
    # the simulated MoA structure is recovered above chance in the real data
    moa = results[(results["data_type"] == "real") & (results["task"] == "moa")]
    assert moa[moa["metric"] == "ROC-AUC"]["value"].mean() > moa[moa["metric"] == "ROC-AUC-chance"]["value"].mean()
    # rerun: every unit committed -> nothing recomputed, same results
    again = evaluate.run(lake, cfg)
    assert again["units_done_now"] == 0 and again["units_skipped"] == 4
    pd.testing.assert_frame_equal(lake.read_table("eval/run=t/results.parquet").to_pandas(), results)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    from pipelines import evaluate
    from pipelines.storage import Lake

    full = Lake(str(tmp_path / "full"))
    broken = Lake(str(tmp_path / "broken"))
    for lk in (full, broken):
        lk.init()
        write_world(lk)
    cfg = replace(CFG, run="t", report=False, copairs=False)
    evaluate.run(full, cfg)
    reference = full.read_table("eval/run=t/results.parquet").to_pandas()

    original = evaluate.crossval.cross_validate
    calls = {"n": 0}

    def crash_on_third_unit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 tasks per data type: the third data type's first task
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate.crossval, "cross_validate", crash_on_third_unit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate.run(broken, cfg)
    assert len(broken.committed_units(evaluate.stage_name("t"))) == 2
    monkeypatch.setattr(evaluate.crossval, "cross_validate", original)
    out = evaluate.run(broken, cfg)
    assert out["units_done_now"] == 2
    pd.testing.assert_frame_equal(broken.read_table("eval/run=t/results.parquet").to_pandas(), reference)
    # a config change invalidates the committed units
    out = evaluate.run(broken, replace(cfg, n_folds=2))
    assert out["units_done_now"] == 4


def test_duckdb_treatment_profiles_match_pandas():
    import duckdb

    from pipelines.evaluate import treatment_profiles

    w = simulate_profiles(n_compounds=30, n_features=10, seed=5)
    keep = (w["meta"]["Metadata_JCP2022"] != DMSO_JCP2022).to_numpy()
    con = duckdb.connect()
    ids, prof = treatment_profiles(con, w["meta"], w["values"], w["features"], keep)
    ref_ids, ref = treatment_means(w["meta"], w["values"])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(prof, ref, rtol=1e-5, atol=1e-5)


def test_discovery_names_and_errors(local_lake):
    from pipelines import evaluate

    with pytest.raises(UserError, match="cpldm profile"):
        evaluate.discover(local_lake, CFG)
    write_world(local_lake)
    found = evaluate.discover(local_lake, CFG)
    assert found == {"real": "real", "real-harmony": "real", "c-aware-N3": "scm-N3", "non-c-aware-N3": "scm-free-N3"}
    with pytest.raises(UserError, match="not in the lake"):
        evaluate.discover(local_lake, replace(CFG, data_types=("c-aware-N100",)))
    local_lake.write_json("synthetic/scm-N3/config.json", {"generation": {"model_kind": "vae"}})
    with pytest.raises(UserError, match="model kind"):
        evaluate.discover(local_lake, CFG)


def test_cli_with_hub_style_annotations(local_lake, tmp_path, capsys):
    """`cpldm evaluate --annotations FILE` joins a Hub-style table on InChIKey through the compounds table."""
    from pipelines.cli import main

    world = write_world(local_lake)
    local_lake.delete("raw/annotations")
    ids = world["annotations"]["Metadata_JCP2022"]
    keys = [f"KEY{i:010d}-UHFFFAOYSA-N" for i in range(len(ids))]
    local_lake.write_named("compounds", pa.table({"Metadata_JCP2022": ids.to_numpy(), "Metadata_InChIKey": keys,
                                                  "Metadata_SMILES": pa.nulls(len(ids), pa.string()),
                                                  "Metadata_pert_type": ["trt"] * len(ids)}))
    hub = pd.DataFrame({"InChIKey": keys, "moa": world["annotations"]["Metadata_moa"].to_numpy(),
                        "target": world["annotations"]["Metadata_target"].to_numpy()})
    path = tmp_path / "hub.tsv"
    hub.to_csv(path, sep="\t", index=False)
    rc = main(["--lake", local_lake.uri, "evaluate", "--preset", "tiny", "--set", "concurrency=0", "--run", "cli",
               "--annotations", str(path), "--data-types", "real,c-aware-N3", "--set", "copairs=false",
               "--set", "report=false"])
    assert rc == 0
    results = local_lake.read_table("eval/run=cli/results.parquet").to_pandas()
    assert set(results["data_type"]) == {"real", "c-aware-N3"}
    assert "report:" in capsys.readouterr().out
    rc = main(["--lake", local_lake.uri, "evaluate", "--preset", "tiny", "--run", "x", "--annotations",
               str(tmp_path / "missing.csv")])
    assert rc == 2
