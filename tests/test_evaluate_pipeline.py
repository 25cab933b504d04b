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
from cpldm_core.evaluation.simulated_profiles import simulate_profiles, treatment_means
from storage_schemas.columns import DMSO_JCP2022

CFG = preset("tiny", concurrency=0)


def _features_table(meta: pd.DataFrame, values: np.ndarray, names, draw=None) -> pa.Table:
    cols = {c: meta[c].astype(str).to_numpy() for c in ("Metadata_Source", "Metadata_Batch", "Metadata_Plate",
                                                        "Metadata_Well", "Metadata_JCP2022", "Metadata_pert_type")}
    table = pa.table({**cols,
                      "Metadata_Draw": pa.array(draw, pa.int32()) if draw is not None else pa.nulls(len(meta), pa.int32()),
                      "Metadata_SiteCount": pa.array(np.full(len(meta), 4), pa.int32())})
    for j, n in enumerate(names):
        table = table.append_column(n, pa.array(values[:, j], pa.float32()))
    return table


def _synthetic(world, draws, batch_strength, seed):
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


def write_world(lake, n_compounds=48, seed=0):
    world = simulate_profiles(n_compounds=n_compounds, n_moas=4, n_features=24, wells_per_compound=2,
                              n_batches=4, dmso_per_batch=8, batch_strength=1.0, confounded=True, seed=seed)
    names = world["features"]
    meta, values = world["meta"], world["values"]
    for plate, rows in meta.groupby("Metadata_Plate").groups.items():
        lake.write_named("features_well", _features_table(meta.loc[rows], values[rows], names),
                         part=f"plate-{plate}", partition={"dataset": "real"})
    for run, kind in (("scm-N3", "scm"), ("scm-free-N3", "scm-free")):
        smeta, svalues = _synthetic(world, 3, 1.0 if kind == "scm" else 2.0, seed=hash(kind) % 1000)
        lake.write_named("features_well", _features_table(smeta, svalues, names, smeta["draw"].to_numpy()),
                         part="block-0", partition={"dataset": run})
        lake.write_json(f"synthetic/{run}/config.json", {"config": {}, "generation": {"model_kind": kind, "draws": 3}})
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
