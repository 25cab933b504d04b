"""`cpldm evaluate` end to end on a small lake (local and moto S3): features_well for `real` and two generation
runs, annotations, split and truth tables -> results for every data type x task x split, statistics, report;
resumability after a crash; DuckDB aggregation against pandas."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from cpldm_core.errors import UserError
from cpldm_core.evaluation.config import preset
from tests._fixtures import features_table, write_evaluation_lake, write_profile_set
from cpldm_core.evaluation.simulated_profiles import simulate_profiles, treatment_means
from cpldm_core.evaluation.truth import truth_space_profiles
from storage_schemas import artifacts as art
from storage_schemas.columns import DMSO_JCP2022

CFG = preset("tiny", concurrency=0)


def write_truth(lake, world, draws=4, dmso_per_draw=8, seed=11):
    """The interventional truth dataset as the simulator renders it: per draw (one plate each), every compound
    and ``dmso_per_draw`` DMSO wells, effect = truth @ the synthetic runs' loadings, fresh noise, no batch."""
    rng = np.random.default_rng(seed)
    truth, names = world["truth"], world["features"]
    loadings = np.random.default_rng(99).normal(size=(truth.shape[1], len(names))) / np.sqrt(truth.shape[1])
    rows, values = [], []
    for d in range(draws):
        for cmp in [*truth.index, *[DMSO_JCP2022] * dmso_per_draw]:
            effect = truth.loc[cmp].to_numpy() @ loadings if cmp != DMSO_JCP2022 else np.zeros(len(names))
            rows.append({"Metadata_Source": "truth", "Metadata_Batch": "truth", "Metadata_Plate": f"draw-{d}",
                         "Metadata_Well": f"W{len(rows):04d}", "Metadata_JCP2022": cmp,
                         "Metadata_pert_type": "negcon" if cmp == DMSO_JCP2022 else "trt"})
            values.append(effect + 0.3 * rng.normal(size=len(names)))
    meta = pd.DataFrame(rows)
    lake.write_named("features_well", features_table(meta, np.asarray(values, np.float32), names,
                                                     np.repeat(np.arange(draws), len(meta) // draws)),
                     part="block-0", partition={"dataset": "truth"})
    write_profile_set(lake, "truth", "generated", {"images": art.InputRef("GenerationRun", "truth", "t" * 64)})


def write_world(lake):
    """The evaluation test lake plus a ``truth`` dataset (which must never become a data type)."""
    world = write_evaluation_lake(lake)
    write_truth(lake, world)
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
    assert "Table 1: MoA prediction" in html and "Verdict" in html and "mAP-label" in html
    paired = lake.read_named("eval_paired").to_pandas()
    assert len(paired) == 6 * 4 * 3 + 6 * 2 * 2       # 6 pairs x (2 tasks x 2 splits x 3 metrics + truth 2 x 2)
    verdict = out["verdict"]
    assert set(verdict["arm"]) == {"c-aware-N3", "non-c-aware-N3"}
    assert set(verdict["verdict"]) <= {"better", "no difference", "worse"}
    featselect = lake.read_table("eval_tables/profiles_featselect/run=t/data_type=real-harmony").to_pandas()
    assert len(featselect) == len(lake.read_table("features/well/dataset=real").to_pandas())
    rec = out["truth_recovery"].set_index(["data_type", "query_split"])
    assert rec[["pearson_mean", "spearman_mean"]].notna().all().all()
    assert set(rec.index.get_level_values(0)) == EXPECTED_TYPES      # the truth itself is no data type
    # c-aware draws follow the truth's loadings with weak batch offsets: closer to the truth than real
    assert rec.loc["c-aware-N3", "pearson_mean"].mean() > rec.loc["real", "pearson_mean"].mean()
    truth = lake.read_named("truth_profiles").to_pandas()
    assert len(truth) == 48 and truth.filter(like="Cells_").shape[1] >= 2
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


def test_heldout_batches_chemistry_nn_oracle_and_truth_data_types(local_lake):
    """With held-out batches, Morgan bits and an oracle run in the lake: real-allwells, chemistry-nn and
    oracle-c-aware-N3 are evaluated; real's seen compounds use held-out wells only (so real != real-allwells);
    chemistry-nn's profiles are real profiles of nearest seen neighbours; the truth is never a data type."""
    from tests._fixtures import synthetic_draws
    from cpldm_core.evaluation.baselines import nearest_seen_neighbours
    from pipelines import evaluate

    world = write_world(local_lake)
    # the second well of each compound plated in a training batch moves to held-out batch_1 (batch label only:
    # plates, hence normalisation, unchanged), so seen compounds have held-out wells to be profiled on
    real = local_lake.read_table("features/well/dataset=real").to_pandas().drop(columns="dataset", errors="ignore")
    second = real.groupby("Metadata_JCP2022").cumcount().to_numpy() == 1
    move = second & real["Metadata_Batch"].isin(["batch_0", "batch_2"]).to_numpy() & \
        (real["Metadata_JCP2022"] != DMSO_JCP2022).to_numpy()
    real.loc[move, "Metadata_Batch"] = "batch_1"
    local_lake.delete("features/well/dataset=real")
    feats = world["features"]
    local_lake.write_named("features_well", features_table(real, real[feats].to_numpy(np.float32), feats),
                           part="moved", partition={"dataset": "real"})
    local_lake.write_named("split_batches", pa.table({
        "Metadata_Source": ["source_1", "source_2", "source_1", "source_2"],
        "Metadata_Batch": [f"batch_{b}" for b in range(4)],
        "Metadata_BatchSplit": ["train", "heldout", "train", "heldout"]}))
    ids = np.array(sorted(world["truth"].index), dtype=object)
    bits = np.random.default_rng(0).random((len(ids), 64)) < 0.3
    local_lake.write_named("embeddings", pa.table({
        "Metadata_JCP2022": ids, "Metadata_InChIKey": pa.nulls(len(ids), pa.string()),
        "Metadata_CanonicalSMILES": ["C"] * len(ids), "embedding": [list(map(float, b)) for b in bits],
        "Metadata_TokenRow": pa.nulls(len(ids), pa.int64())}), part="part-0", partition={"encoder": "morgan-r2-64"})
    smeta, svalues = synthetic_draws(world, 3, 0.0, seed=5)
    local_lake.write_named("features_well", features_table(smeta, svalues, world["features"],
                                                           smeta["draw"].to_numpy()),
                           part="block-0", partition={"dataset": "oracle-run"})
    local_lake.write_json("synthetic/oracle-run/config.json", {"generation": {"oracle": "c-aware", "draws": 3}})
    write_profile_set(local_lake, "oracle-run", "generated",
                      {"images": art.InputRef("GenerationRun", "oracle-run", "o" * 64)})
    found = evaluate.discover(local_lake, CFG, heldout=True, fingerprints=True)
    assert {"real-allwells", "chemistry-nn", "oracle-c-aware-N3"} <= set(found) and "truth" not in found
    cfg = replace(CFG, run="h", report=False, copairs=False,
                  data_types=("real", "real-allwells", "chemistry-nn"))
    out = evaluate.run(local_lake, cfg)
    res = local_lake.read_table("eval/run=h/results.parquet").to_pandas()
    m = res[(res["metric"] == "mAP") & (res["fold"] >= 0)].groupby(["data_type", "task", "query_split"])["value"]
    seen = m.mean().xs("seen", level=2)
    assert not np.allclose(seen.loc["real"], seen.loc["real-allwells"])        # different wells for seen
    assert len(out["verdict"]) == 0                                              # no generated arm here
    # chemistry-nn's truth-space profile of a compound = real-allwells' profile of its nearest seen neighbour
    rec = local_lake.read_named("eval_truth_recovery").to_pandas()
    rec = rec[rec["run"] == "h"].set_index(["data_type", "Metadata_JCP2022"])["pearson_r"]
    split = world["split"]
    nn = nearest_seen_neighbours(ids, bits, (split.reindex(ids) == "seen").to_numpy())
    truth = local_lake.read_named("truth_profiles").to_pandas()
    truth = truth[truth["run"] == "h"].drop(columns="run").set_index("Metadata_JCP2022")
    assert list(truth.index) == list(ids)
    moved_seen = set(real.loc[move, "Metadata_JCP2022"]) & set(split[split == "seen"].index)
    assert any(abs(rec.loc[("real", c)] - rec.loc[("real-allwells", c)]) > 1e-3 for c in moved_seen)
    control = (world["meta"]["Metadata_JCP2022"] == DMSO_JCP2022).to_numpy()
    real_ids, real_prof = truth_space_profiles(world["meta"], world["values"], world["features"], list(truth.columns),
                                               control, ~control, CFG.outlier_threshold)
    row = {c: i for i, c in enumerate(real_ids)}
    # reference: scipy's Pearson r after centring profiles and truth on their mean compound within each split
    for name in ("seen", "unseen"):
        members = [c for c in ids if split[c] == name]
        t = truth.loc[members].to_numpy(np.float64)
        t = t - t.mean(axis=0)
        for data_type, source in (("chemistry-nn", [nn[c] for c in members]), ("real-allwells", members)):
            p = real_prof[[row[c] for c in source]].astype(np.float64)
            p = p - p.mean(axis=0)
            for i, c in enumerate(members):
                assert rec.loc[(data_type, c)] == pytest.approx(stats.pearsonr(p[i], t[i])[0], abs=1e-5), (data_type, c)
                if name == "unseen":   # unseen compounds: all wells in both real variants
                    assert rec.loc[("real", c)] == pytest.approx(rec.loc[("real-allwells", c)], abs=1e-6)


def test_only_science_or_changed_profiles_recompute(local_lake):
    """One rule: committed units are reused when only resources differ (concurrency, CPUs, report), recomputed
    when a science setting differs or a data type's ProfileSet is not the one the stored EvalRun names."""
    from cpldm_core.configuration import config_to_dict
    from pipelines import evaluate

    write_evaluation_lake(local_lake, n_compounds=8, n_features=4)
    cfg = replace(CFG, run="r")
    local_lake.commit_unit(evaluate.stage_name("r"), "real", {"config": config_to_dict(cfg)})
    types = {"real": "real", "c-aware-N3": "scm-N3"}
    planned = evaluate.eval_record(local_lake, cfg, types, truth=False)
    assert planned.inputs["c-aware-N3"] == art.read_artifact(local_lake, art.ProfileSet, "scm-N3").ref()
    art.write_record(local_lake, "eval/r", planned)
    assert not evaluate._config_changed(local_lake, replace(cfg, concurrency=3, num_cpus=2.0, report=False), planned)
    assert evaluate._config_changed(local_lake, replace(cfg, n_folds=cfg.n_folds + 1), planned)
    write_profile_set(local_lake, "scm-N3", "generated", {"images": art.InputRef("GenerationRun", "scm-N3", "h" * 64)})
    assert evaluate._config_changed(local_lake, cfg, evaluate.eval_record(local_lake, cfg, types, truth=False))
    # a dataset without its ProfileSet is one line naming the command that makes it
    local_lake.delete("features/_config/scm-N3/_artifact.json")
    with pytest.raises(art.ArtifactMissing, match=r"no ProfileSet record.*`cpldm profile --dataset scm-N3`$"):
        evaluate.eval_record(local_lake, cfg, types, truth=False)
