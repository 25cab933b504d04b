"""Evaluation building blocks against reference implementations: scikit-learn (AP, ROC-AUC), statsmodels and
scipy (ANOVA, Tukey), pycytominer (MAD normalisation, feature selection), a naive loop (subprofiles)."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from cpldm_core.evaluation.feature_select import select_features
from cpldm_core.evaluation.labels import hub_annotations, moa_labels, target_labels
from cpldm_core.evaluation.metrics import (average_precision_per_query, mean_average_precision,
                                           roc_auc_per_label)
from cpldm_core.evaluation.normalize import robust_mad_normalize
from cpldm_core.evaluation.statistics import compare_data_types, one_way_anova, tukey_hsd
from cpldm_core.evaluation.subprofiles import EMPTY_SCORE, biosimilarity, build_subprofile


def _scores(seed, q=40, n_labels=12, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(q, n_labels))
    if ties:
        scores = np.round(scores, 0)  # many tied scores: sklearn groups them into one threshold
    truth = rng.random((q, n_labels)) < 0.2
    truth[np.arange(q), rng.integers(0, n_labels, q)] = True
    return scores, truth


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    scores, truth = _scores(1, ties=ties)
    ours = average_precision_per_query(scores, truth)
    ref = [average_precision_score(t, s) for s, t in zip(scores, truth)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_average_precision_valid_mask_equals_dropping_pairs():
    scores, truth = _scores(2, ties=True)
    valid = np.random.default_rng(3).random(truth.shape) > 0.3
    ours = average_precision_per_query(scores, truth, valid, chunk=7)  # blocks give the same answer
    for i in range(len(scores)):
        t, s = truth[i][valid[i]], scores[i][valid[i]]
        if t.any():
            assert ours[i] == pytest.approx(average_precision_score(t, s), rel=1e-12)
        else:
            assert np.isnan(ours[i])
    m, n = mean_average_precision(scores, truth, valid)
    assert n == int(np.isfinite(ours).sum()) and m == pytest.approx(np.nanmean(ours))


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_sklearn(ties):
    scores, truth = _scores(4, q=60, ties=ties)
    valid = np.random.default_rng(5).random(truth.shape) > 0.2
    ours = roc_auc_per_label(scores, truth, valid)
    for j in range(truth.shape[1]):
        t, s = truth[valid[:, j], j], scores[valid[:, j], j]
        if 0 < t.sum() < len(t):
            assert ours[j] == pytest.approx(roc_auc_score(t, s), rel=1e-12)
        else:
            assert np.isnan(ours[j])


def test_subprofile_and_biosimilarity_match_naive_loop():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(5, 30)) + np.r_[np.full(10, 5.0), np.zeros(20)]
    mask, values = build_subprofile(refs, 0.85)
    signs = np.sign(refs)
    naive = [max((signs[:, j] > 0).mean(), (signs[:, j] < 0).mean()) > 0.85 for j in range(30)]
    np.testing.assert_array_equal(mask, naive)
    assert mask[:10].all()  # the shifted features are sign-consistent in all 5 references
    np.testing.assert_allclose(values[mask], np.median(refs[:, mask], axis=0), rtol=1e-6)
    queries = rng.normal(size=(7, 30))
    masks = np.stack([mask, np.zeros(30, bool), rng.random(30) > 0.5])
    vals = np.stack([values, np.zeros(30), rng.normal(size=30)]).astype(np.float32)
    scores = biosimilarity(queries, masks, vals, chunk=3)
    for i in range(7):
        for j in (0, 2):
            ref = stats.pearsonr(queries[i, masks[j]], vals[j, masks[j]])[0]
            assert scores[i, j] == pytest.approx(ref, abs=1e-5)
    assert (scores[:, 1] == EMPTY_SCORE).all()  # empty subprofile ranks last


def test_mad_normalisation_matches_pycytominer_per_plate():
    import pycytominer

    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame(rng.gamma(2.0, size=(n, 4)) * 10, columns=[f"Cells_F_{i}" for i in range(4)])
    frame.insert(0, "Metadata_Plate", np.repeat(["p1", "p2"], n // 2))
    frame.insert(1, "Metadata_pert_type", np.where(np.arange(n) % 4 == 0, "negcon", "trt"))
    frame.loc[frame["Metadata_Plate"] == "p2", "Cells_F_0"] += 100  # plate effect removed by per-plate stats
    feats = [c for c in frame.columns if c.startswith("Cells")]
    ours, missing = robust_mad_normalize(frame[feats].to_numpy(), frame["Metadata_Plate"].to_numpy(),
                                         (frame["Metadata_pert_type"] == "negcon").to_numpy())
    assert missing == []
    for plate, sub in frame.groupby("Metadata_Plate"):
        ref = pycytominer.normalize(sub, features=feats, meta_features=["Metadata_Plate", "Metadata_pert_type"],
                                    samples="Metadata_pert_type == 'negcon'", method="mad_robustize")
        np.testing.assert_allclose(ours[sub.index], ref[feats].to_numpy(), rtol=1e-4, atol=1e-5)


def test_variant_features_match_the_jump_recipe_rule_per_plate():
    """The JUMP recipe's rule, computed naively with pandas + scipy on the controls of each plate: keep a feature
    when its MAD != 0 and |MAD / median| (0 where the median is 0) > 1e-3 on every plate."""
    from scipy.stats import median_abs_deviation

    from cpldm_core.evaluation.normalize import variant_features

    rng = np.random.default_rng(3)
    n = 80
    frame = pd.DataFrame(rng.gamma(2.0, size=(n, 6)) * 10, columns=[f"Cells_F_{i}" for i in range(6)])
    plates = np.repeat(["p1", "p2"], n // 2)
    control = np.arange(n) % 4 == 0
    frame.loc[control & (plates == "p2"), "Cells_F_1"] = 7.0           # constant among p2's DMSO wells only
    frame.loc[control, "Cells_F_2"] = 3.0 + 1e-6 * rng.normal(size=control.sum())  # |MAD/median| ~ 1e-7
    frame.loc[control, "Cells_F_3"] = rng.normal(size=control.sum())   # median ~0, MAD > 0: coefficient kept
    frame.loc[control, "Cells_F_4"] = rng.choice([0.0, 0.0, 0.0, 5.0], size=control.sum())  # median 0: dropped
    frame.loc[3, "Cells_F_5"] = np.nan                                   # a NaN is omitted, not fatal
    keep = variant_features(frame.to_numpy(), plates, control)
    expected = np.ones(6, dtype=bool)
    for plate in ("p1", "p2"):
        ref = frame[control & (plates == plate)]
        mad = median_abs_deviation(ref, nan_policy="omit", axis=0)
        coef = pd.Series(mad / ref.median().to_numpy()).fillna(0).abs().replace(np.inf, 0).to_numpy()
        expected &= (mad != 0) & (coef > 1e-3)
    assert keep.tolist() == expected.tolist()
    assert not keep[1] and not keep[2] and keep[0] and keep[5]


def test_outlier_step_matches_the_jump_recipe():
    from cpldm_core.evaluation.feature_select import drop_and_clip_outliers

    rng = np.random.default_rng(4)
    values = rng.normal(size=(300, 4)) * [1.0, 1.0, 20.0, 1.0]   # column 2: |x| up to ~60, some > 40
    values[:10, 1] = 1e17                       # a blown-up feature (zero DMSO MAD): 99th percentile > 100
    values[0, 3] = 500.0                        # one extreme value: below the percentile rule, clipped
    kept, clipped = drop_and_clip_outliers(values)
    frame = pd.DataFrame(values)
    expected = ~(frame.abs().quantile(0.99) > 100).to_numpy()
    assert kept.tolist() == expected.tolist() == [True, False, True, True]
    np.testing.assert_allclose(clipped[:, kept], frame.loc[:, kept].clip(-100, 100).to_numpy(), rtol=1e-6)
    assert clipped[0, 3] == 100.0


def test_feature_selection_matches_pycytominer_ops_on_known_structure():
    import pycytominer

    rng = np.random.default_rng(1)
    n = 200
    base = rng.normal(size=(n, 6))
    values = np.column_stack([base, base[:, 0] * 2 + 1e-3 * rng.normal(size=n),  # correlated copy
                              1.0 + 1e-5 * rng.normal(size=n),                   # variance < 1e-6
                              np.where(rng.random(n) < 0.3, np.nan, 1.0) * rng.normal(size=n)])  # NaN
    names = [f"Cells_F_{i}" for i in range(values.shape[1])]
    kept = select_features(values, names)
    ref = pycytominer.feature_select(pd.DataFrame(values, columns=names), features=names,
                                     operation=["variance_threshold", "correlation_threshold", "drop_na_columns"])
    assert kept == [c for c in names if c in ref.columns]
    assert "Cells_F_7" not in kept and "Cells_F_8" not in kept
    assert ("Cells_F_0" in kept) != ("Cells_F_6" in kept)  # one of the correlated pair goes


def test_anova_and_tukey_match_scipy():
    rng = np.random.default_rng(0)
    groups = np.repeat(["real", "real-harmony", "c-aware-N10"], 10)
    values = rng.normal(size=30) + np.repeat([0.0, 0.2, 1.0], 10)
    res = one_way_anova(values, groups)
    ref = stats.f_oneway(*[values[groups == g] for g in np.unique(groups)])
    assert res["F"] == pytest.approx(ref.statistic, rel=1e-8)
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    tk = tukey_hsd(values, groups)
    names = sorted(np.unique(groups))
    sp = stats.tukey_hsd(*[values[groups == g] for g in names])
    for _, row in tk.iterrows():
        i, j = names.index(row["group1"]), names.index(row["group2"])
        assert row["p_adj"] == pytest.approx(sp.pvalue[i, j], abs=2e-3)
        assert row["meandiff"] == pytest.approx(values[groups == row["group2"]].mean()
                                                - values[groups == row["group1"]].mean())
    results = pd.DataFrame({"data_type": groups, "task": "moa", "query_split": "seen", "fold": np.tile(range(10), 3),
                            "metric": "mAP", "value": values})
    anova, tukey = compare_data_types(results)
    assert len(anova) == 1 and len(tukey) == 3
    assert anova["F"].iloc[0] == pytest.approx(ref.statistic)


def test_labels_rules_and_exclusions():
    ann = pd.DataFrame({"Metadata_JCP2022": ["a", "b", "c", "d", "e", "f", "g", "zz"],
                        "Metadata_moa": ["m1", "m1", "m1", "m1|m2", "m2", "m2", None, "m1"]})
    profiled = ["a", "b", "c", "d", "e", "f", "g", "h"]
    labels, excl = moa_labels(ann, profiled, min_compounds=3)
    assert list(labels.labels) == ["m1"] and list(labels.compounds) == ["a", "b", "c"]
    reasons = dict(zip(excl["Metadata_JCP2022"], excl["reason"]))
    assert set(reasons) == {"d", "e", "f", "g", "h", "zz"}  # every left-out compound has a reason
    assert "2 MoAs" in reasons["d"] and "< 3" in reasons["e"] and reasons["zz"] == "annotated but not profiled"
    tgt = pd.DataFrame({"Metadata_JCP2022": ["a", "b", "c", "d"], "Metadata_target": ["T1|T2", "T1", "T2|T3", "T3"]})
    tl, texcl = target_labels(tgt, ["a", "b", "c", "d"], min_compounds=2)
    assert list(tl.labels) == ["T1", "T2", "T3"]
    assert tl.membership.sum() == 6 and tl.membership[0].sum() == 2


def test_hub_annotations_join_on_inchikey():
    hub = pd.DataFrame({"InChIKey": ["AAA-X-N", "AAA-X-N", "BBB-Y-N"], "moa": ["m1", "m2", "m3"],
                        "target": ["T1", "T2|T1", None]})
    compounds = pd.DataFrame({"Metadata_JCP2022": ["c1", "c2", "c3"],
                              "Metadata_InChIKey": ["AAA-X-N", "BBB-Y-N", "CCC-Z-N"]})
    out = hub_annotations(hub, compounds).set_index("Metadata_JCP2022")
    assert out.loc["c1", "Metadata_moa"] == "m1|m2" and out.loc["c1", "Metadata_target"] == "T1|T2"
    assert "c3" not in out.index
    with pytest.raises(ValueError, match="InChIKey"):
        hub_annotations(hub.drop(columns="InChIKey"), compounds, source="hub.csv")
