"""The evaluation method on simulated profiles with known structure (MoA signal + batch effects), Harmony
against harmonypy, copairs, truth recovery, and the real JUMP-MOA / LINCS plates when present."""
import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from cpldm_core.evaluation import copairs_metrics
from cpldm_core.evaluation.crossval import cross_validate, draw_references
from cpldm_core.evaluation.harmony import batch_silhouette, harmony_correct
from cpldm_core.evaluation.labels import moa_labels, target_labels
from cpldm_core.evaluation.normalize import robust_mad_normalize
from cpldm_core.evaluation.simulated_profiles import simulate_profiles, treatment_means


def _evaluate(world, values, task="moa", folds=3, k=5, min_compounds=5):
    ids, profiles = treatment_means(world["meta"], values)
    column = "Metadata_moa" if task == "moa" else "Metadata_target"
    fn = moa_labels if task == "moa" else target_labels
    labels, _ = fn(world["annotations"][["Metadata_JCP2022", column]], list(ids), min_compounds)
    pos = {c: i for i, c in enumerate(ids)}
    res = cross_validate(profiles[[pos[c] for c in labels.compounds]], labels,
                         world["split"].reindex(labels.compounds).to_numpy(), folds, k, 0.85)
    return res.groupby("metric")["value"].mean()


@pytest.fixture(scope="module")
def clean_world():
    return simulate_profiles(seed=1)


@pytest.mark.parametrize("task", ["moa", "target"])
def test_recovers_labels_well_above_chance(clean_world, task):
    w = clean_world
    values, _ = robust_mad_normalize(w["values"], w["meta"]["Metadata_Plate"].to_numpy(),
                                     (w["meta"]["Metadata_pert_type"] == "negcon").to_numpy())
    m = _evaluate(w, values, task)
    assert m["mAP"] > 1.5 * m["mAP-chance"] and m["mAP"] > m["mAP-chance"] + 0.15
    assert m["ROC-AUC"] > 0.7 and abs(m["ROC-AUC-chance"] - 0.5) < 0.1


def test_shuffled_labels_score_at_chance(clean_world):
    w = dict(clean_world)
    ann = w["annotations"].copy()
    ann["Metadata_moa"] = np.random.default_rng(0).permutation(ann["Metadata_moa"].to_numpy())
    w["annotations"] = ann
    m = _evaluate(w, w["values"])
    assert abs(m["ROC-AUC"] - 0.5) < 0.1 and m["mAP"] < m["mAP-chance"] + 0.1


def test_references_redrawn_per_fold_and_never_queries(clean_world):
    ids, profiles = treatment_means(clean_world["meta"], clean_world["values"])
    labels, _ = moa_labels(clean_world["annotations"][["Metadata_JCP2022", "Metadata_moa"]], list(ids), 5)
    a = draw_references(labels, 5, np.random.default_rng([0, 0]))
    b = draw_references(labels, 5, np.random.default_rng([0, 1]))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    for j, rows in enumerate(a):
        assert len(rows) == 5 and labels.membership[rows, j].all()


def test_unconfounded_world_scores_at_least_as_well_as_confounded():
    kw = dict(batch_strength=1.0, seed=2)
    free = simulate_profiles(confounded=False, **kw)
    conf = simulate_profiles(confounded=True, **kw)
    assert _evaluate(free, free["values"])["mAP"] >= _evaluate(conf, conf["values"])["mAP"]


def test_harmony_matches_harmonypy_and_helps_under_confounding():
    import harmonypy

    w = simulate_profiles(confounded=True, batch_strength=1.0, seed=1)
    meta, values = w["meta"], w["values"]
    ours = harmony_correct(values, meta, "batch", seed=0)
    direct = np.asarray(harmonypy.run_harmony(values.astype(np.float64), meta, ["Metadata_Batch"],
                                              random_state=0, verbose=False).Z_corr)
    np.testing.assert_allclose(ours, direct, rtol=1e-4, atol=1e-4)
    batches = meta["Metadata_Batch"].to_numpy()
    before, after = batch_silhouette(values, batches), batch_silhouette(ours, batches)
    assert after < before - 0.1  # batches mixed
    assert _evaluate(w, ours)["mAP"] > _evaluate(w, values)["mAP"] + 0.05
    # "both" uses source and batch as covariates and still runs; a single batch level is a no-op
    assert harmony_correct(values, meta, "both").shape == values.shape
    one = meta.assign(Metadata_Batch="b")
    np.testing.assert_array_equal(harmony_correct(values, one, "batch"), values)


def test_copairs_activity_and_consistency(clean_world):
    w = clean_world
    meta = w["meta"]
    controls = (meta["Metadata_pert_type"] == "negcon").to_numpy()
    act = copairs_metrics.phenotypic_activity(w["values"], meta["Metadata_JCP2022"].to_numpy(), controls,
                                              null_size=100)
    assert len(act) == w["split"].size and act["below_corrected_p"].mean() > 0.5
    # destroy the signal: treated wells become DMSO-like -> few compounds active
    flat = np.where(controls[:, None], w["values"], w["values"][controls].mean(0)
                    + np.random.default_rng(0).normal(size=w["values"].shape) * w["values"][controls].std(0))
    act0 = copairs_metrics.phenotypic_activity(flat, meta["Metadata_JCP2022"].to_numpy(), controls, null_size=100)
    assert act0["below_corrected_p"].mean() < 0.2
    ids, profiles = treatment_means(meta, w["values"])
    cons = copairs_metrics.moa_consistency(profiles, w["moa_of"].loc[ids].to_numpy(), null_size=100)
    assert len(cons) == w["moa_of"].nunique() and cons["mean_average_precision"].mean() > 0.5


def _plate(path):
    frame = pd.read_csv(path, low_memory=False)
    feats = [c for c in frame.columns if not c.startswith("Metadata_")]
    return frame, feats


def _plate_eval(frame, feats, compound_col, moa_col, min_compounds):
    """Compound profiles = mean of their wells (already normalised and feature-selected upstream)."""
    trt = frame[frame[moa_col].notna() & frame[compound_col].notna()]
    profiles = trt.groupby(compound_col)[feats].mean()
    ann = trt.groupby(compound_col)[moa_col].first().rename("Metadata_moa").reset_index().rename(
        columns={compound_col: "Metadata_JCP2022"})
    labels, excl = moa_labels(ann, list(profiles.index), min_compounds)
    values = profiles.loc[labels.compounds].to_numpy(np.float32)
    values = np.nan_to_num(values)
    res = cross_validate(values, labels, np.full(len(values), "seen"), 5, 1, 0.85)
    return res.groupby("metric")["value"].mean(), labels, excl


def test_real_jump_moa_plate_runs_above_chance():
    frame, feats = _plate(shared_path(
        "data", "profiles", "cpg0002_jumpscope__BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"))
    # JUMP-MOA: 2 compounds per MoA -> K = 1 reference, the other compound is the query
    m, labels, excl = _plate_eval(frame, feats, "Metadata_broad_sample", "Metadata_moa", 2)
    assert len(labels.labels) >= 20
    assert m["mAP"] > m["mAP-chance"] and m["ROC-AUC"] > 0.5


def test_real_lincs_plate_runs():
    frame, feats = _plate(shared_path("data", "profiles", "lincs__SQ00015054_normalized_feature_select.csv.gz"))
    frame = frame[frame["Metadata_moa"].notna()]
    m, labels, excl = _plate_eval(frame, feats, "Metadata_pert_id", "Metadata_moa", 1 + 1)
    # multi-MoA strings ("a|b") are excluded with a reason
    assert excl["reason"].str.contains("MoAs").any() or len(labels.labels) > 0
    assert np.isfinite(m["mAP"]) and np.isfinite(m["ROC-AUC"])


def test_hub_annotations_join_the_jump_moa_plate_on_inchikey():
    """The Repurposing Hub file (read, not copied) joined on InChIKey gives the plate's own MoA labels."""
    frame, _ = _plate(shared_path(
        "data", "profiles", "cpg0002_jumpscope__BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"))
    hub = pd.read_csv(shared_path("data", "annotations", "compound-annotator__compound_rephub_annot.csv.gz"))
    trt = frame[frame["Metadata_moa"].notna()].drop_duplicates("Metadata_broad_sample")
    compounds = pd.DataFrame({"Metadata_JCP2022": trt["Metadata_broad_sample"],
                              "Metadata_InChIKey": trt["Metadata_InChIKey"]})
    from cpldm_core.evaluation.labels import hub_annotations
    full_key = hub_annotations(hub, compounds)
    joined = hub_annotations(hub, compounds, prefix14=True).merge(
        trt[["Metadata_broad_sample", "Metadata_moa"]].rename(columns={"Metadata_broad_sample": "Metadata_JCP2022",
                                                                      "Metadata_moa": "plate_moa"}))
    assert len(joined) >= len(full_key) and len(joined) > 0.4 * len(trt)  # connectivity block matches more
    agree = [p.lower() in str(h).lower().split("|") for p, h in zip(joined["plate_moa"], joined["Metadata_moa"])]
    assert np.mean(agree) > 0.5
