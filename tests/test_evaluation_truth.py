"""Truth recovery against the interventional truth profiles (nothing fitted per data type), the shared
normalisation on the truth-selected features, and the held-out-batch rule for seen compounds: each against a
naive pandas/scipy computation."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpldm_core.errors import UserError
from cpldm_core.evaluation.config import preset
from cpldm_core.evaluation.recipe import evaluate_wells, heldout_profile_rows, process_wells, truth_reference
from cpldm_core.evaluation.simulated_profiles import simulate_profiles
from cpldm_core.evaluation.truth import (normalize_masked, rowwise_correlations, truth_recovery,
                                         truth_space_profiles)
from storage_schemas.columns import DMSO_JCP2022

CFG = preset("tiny", concurrency=0, copairs=False, embedding="pca")


def test_rowwise_correlations_equal_scipy_per_row():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 30))
    y = x + rng.normal(size=(12, 30))
    x[3, :5] = x[3, 5]            # ties: Spearman uses average ranks, like scipy
    pr, sr = rowwise_correlations(x, y)
    for i in range(12):
        assert pr[i] == pytest.approx(stats.pearsonr(x[i], y[i])[0], abs=1e-12)
        assert sr[i] == pytest.approx(stats.spearmanr(x[i], y[i])[0], abs=1e-12)
    ids = np.array([f"c{i}" for i in range(12)], dtype=object)
    rec = truth_recovery(ids[::-1], x[::-1], ids[:10], y[:10])   # alignment by id, not by row
    assert list(rec["Metadata_JCP2022"]) == sorted(ids[:10])
    # reference: pandas, each side centred on the mean over the compared compounds
    px, py = pd.DataFrame(x, index=ids).loc[ids[:10]], pd.DataFrame(y, index=ids).loc[ids[:10]]
    naive = (px - px.mean()).T.corrwith((py - py.mean()).T)
    np.testing.assert_allclose(rec["pearson_r"], naive.loc[rec["Metadata_JCP2022"]].to_numpy(), atol=1e-12)
    naive_s = (px - px.mean()).T.corrwith((py - py.mean()).T, method="spearman")
    np.testing.assert_allclose(rec["spearman_r"], naive_s.loc[rec["Metadata_JCP2022"]].to_numpy(), atol=1e-12)


def test_a_component_shared_by_every_treatment_is_not_credited():
    """The no-effect control's failure: no compound effect, but every treatment shares one vector (the wells of
    p'(C) differ from the DMSO wells) in the truth and in a data type alike. Recovery must stay at chance."""
    rng = np.random.default_rng(4)
    n, k = 60, 40
    shared = 3 * rng.normal(size=k)
    truth = shared + rng.normal(size=(n, k))
    profiles = shared + rng.normal(size=(n, k))          # independent of the truth apart from `shared`
    ids = np.array([f"c{i:03d}" for i in range(n)], dtype=object)
    rec = truth_recovery(ids, profiles, ids, truth)
    assert abs(rec["pearson_r"].mean()) < 0.05 and abs(rec["spearman_r"].mean()) < 0.05
    uncentred = rowwise_correlations(profiles, truth)[0]
    assert uncentred.mean() > 0.7                       # what the metric credited before centring


def test_a_per_moa_offset_lowers_truth_recovery():
    """The bias the former ridge metric absorbed: profiles = truth + a per-MoA offset of 2 profile SDs. Nothing
    is fitted, so the offset moves every profile away from its truth and the recovery falls."""
    rng = np.random.default_rng(1)
    n, k, n_moa = 80, 40, 4
    moa = rng.integers(0, n_moa, n)
    truth = rng.normal(size=(n_moa, k))[moa] + 0.5 * rng.normal(size=(n, k))
    unbiased = truth + 0.5 * rng.normal(size=(n, k))
    biased = unbiased + 2 * unbiased.std() * rng.normal(size=(n_moa, k))[moa]
    ids = np.array([f"c{i:03d}" for i in range(n)], dtype=object)
    clean = truth_recovery(ids, unbiased, ids, truth)
    moved = truth_recovery(ids, biased, ids, truth)
    assert moved["pearson_r"].mean() < clean["pearson_r"].mean() - 0.2
    assert moved["spearman_r"].mean() < clean["spearman_r"].mean() - 0.2


def test_masked_normalisation_equals_naive_per_plate_and_masks_zero_mad():
    rng = np.random.default_rng(2)
    n = 48
    values = rng.gamma(2.0, size=(n, 3)) * 10
    plates = np.repeat(["d0", "d1"], n // 2)
    control = np.arange(n) % 4 == 0
    values[control & (plates == "d1"), 2] = 5.0                 # constant among d1's DMSO: d1 cannot scale it
    values[1, 0] = 1e6                                           # clipped at the outlier threshold
    out = normalize_masked(values, plates, control, clip=100.0)
    for p in ("d0", "d1"):
        ref = pd.DataFrame(values[control & (plates == p)])
        med = ref.median()
        mad = (ref - med).abs().median() * 1.4826022185056018
        expected = ((pd.DataFrame(values[plates == p]) - med) / mad).clip(-100, 100)
        if p == "d1":
            expected[2] = np.nan
        np.testing.assert_allclose(out[plates == p], expected.to_numpy(), rtol=1e-5)


def _truth_world(seed=3, offset=0.0):
    """Truth dataset (draws as plates, no batch effect) and a 'real' dataset of the same compounds."""
    w = simulate_profiles(n_compounds=40, n_moas=4, n_features=20, wells_per_compound=2, n_batches=4,
                          dmso_per_batch=8, batch_strength=offset, confounded=True, well_noise=0.3, seed=seed)
    return w


def test_truth_reference_and_data_type_share_features_and_normalisation():
    w = _truth_world()
    truth = truth_reference(w["meta"], w["values"], w["features"], CFG)
    processed = process_wells(w["meta"], w["values"], w["features"], CFG, silhouettes=False)
    assert truth.features == processed.features                 # the recipe's own selection on the truth
    ids, prof = truth_space_profiles(w["meta"], w["values"], w["features"], truth.features,
                                     processed.is_control, ~processed.is_control, CFG.outlier_threshold)
    np.testing.assert_array_equal(ids, truth.compounds)
    np.testing.assert_allclose(prof, truth.profiles)
    # naive: per-plate DMSO median / scaled MAD on the common features, mean per compound
    frame = pd.DataFrame(w["values"], columns=w["features"])[truth.features]
    meta = w["meta"]
    parts = []
    for plate, rows in meta.groupby("Metadata_Plate").groups.items():
        sub = frame.loc[rows]
        ref = sub[meta.loc[rows, "Metadata_JCP2022"] == DMSO_JCP2022]
        parts.append((sub - ref.median()) / ((ref - ref.median()).abs().median() * 1.4826022185056018))
    norm = pd.concat(parts).sort_index().clip(-100, 100)
    treat = meta["Metadata_JCP2022"] != DMSO_JCP2022
    naive = norm[treat].groupby(meta.loc[treat, "Metadata_JCP2022"]).mean().sort_index()
    np.testing.assert_allclose(truth.profiles, naive.to_numpy(), rtol=1e-4, atol=1e-5)


def test_evaluate_wells_recovers_truth_and_confounding_lowers_it():
    """A profile-level world: the 'truth' dataset renders compounds without batch effects; a confounded real
    dataset (compounds sit in one batch, batch offsets survive DMSO normalisation only partly) recovers the
    truth less well than an unconfounded one of the same compounds."""
    truth_world = _truth_world(seed=4)
    truth = truth_reference(truth_world["meta"], truth_world["values"], truth_world["features"], CFG)
    scores = []
    for strength in (0.0, 3.0):
        w = _truth_world(seed=4, offset=strength)
        # same compounds and truth, different wells: batch offsets hit treatments but not DMSO (plate = batch
        # here, so add them only to the treatment rows, as a confounder DMSO does not sample would)
        values = w["values"].copy()
        treat = (w["meta"]["Metadata_JCP2022"] != DMSO_JCP2022).to_numpy()
        offsets = np.random.default_rng(9).normal(size=(4, values.shape[1])) * strength
        batch = w["meta"]["Metadata_Batch"].str[-1].astype(int).to_numpy()
        values[treat] += offsets[batch[treat]]
        out = evaluate_wells(w["meta"], values, w["features"], {}, CFG, data_type="real", truth=truth)
        scores.append(out.recovery["pearson_r"].mean())
        assert set(out.results["metric"]) >= {"truth-pearson-mean", "truth-spearman-mean"}
    assert scores[0] > 0.8 and scores[1] < scores[0] - 0.2


def test_seen_compounds_use_heldout_batches_only():
    meta = pd.DataFrame({"Metadata_JCP2022": ["a", "a", "b", "b", "c", "c", DMSO_JCP2022],
                         "Metadata_Batch": ["b1", "b2", "b1", "b1", "b1", "b2", "b2"]})
    split = pd.Series({"a": "seen", "b": "seen", "c": "unseen"})
    control = (meta["Metadata_JCP2022"] == DMSO_JCP2022).to_numpy()
    rows, fallback = heldout_profile_rows(meta, split, {"b2"}, control)
    # naive: seen -> held-out wells (all wells when it has none there); unseen -> all wells; never DMSO
    expected = []
    for i, r in meta.iterrows():
        if control[i]:
            expected.append(False)
        elif split[r["Metadata_JCP2022"]] == "unseen":
            expected.append(True)
        else:
            own = meta[meta["Metadata_JCP2022"] == r["Metadata_JCP2022"]]
            expected.append(r["Metadata_Batch"] == "b2" or not (own["Metadata_Batch"] == "b2").any())
    assert rows.tolist() == expected == [False, True, True, True, True, True, False]
    assert fallback == 1
    rows, fallback = heldout_profile_rows(meta, split, set(), control)
    assert rows.tolist() == (~control).tolist() and fallback == 0


def test_prenormalised_table_gives_results_or_a_one_line_error():
    w = _truth_world(seed=5)
    norm, _ = __import__("cpldm_core.evaluation.normalize", fromlist=["x"]).robust_mad_normalize(
        w["values"], w["meta"]["Metadata_Plate"].to_numpy(),
        (w["meta"]["Metadata_JCP2022"] == DMSO_JCP2022).to_numpy())
    with pytest.raises(UserError, match="variant-feature step.*already normalised"):
        process_wells(w["meta"], norm, w["features"], CFG, label="imported")
    out = process_wells(w["meta"], norm, w["features"], CFG, already_normalized=True, label="imported")
    assert len(out.features) >= 2
    with pytest.raises(UserError, match="imported: no feature left after feature selection"):
        const = np.ones_like(norm)
        process_wells(w["meta"], const, w["features"], CFG, already_normalized=True, label="imported")
