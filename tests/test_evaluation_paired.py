"""Per-label mAP against scikit-learn, paired statistics against scipy / statsmodels, the verdict words, and the
chemistry-nn baseline against a brute-force nearest neighbour."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score
from statsmodels.stats.multitest import multipletests

from cpldm_core.evaluation.baselines import nearest_seen_neighbours, tanimoto
from cpldm_core.evaluation.crossval import cross_validate
from cpldm_core.evaluation.labels import LabelSet
from cpldm_core.evaluation.metrics import average_precision_per_label, mean_average_precision_per_label
from cpldm_core.evaluation.statistics import (counterpart, holm_adjust, paired_and_verdicts, paired_difference,
                                              paired_tests)


@pytest.mark.parametrize("ties", [False, True])
def test_per_label_ap_equals_sklearn_average_none(ties):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 7))
    scores = np.round(scores) if ties else scores
    truth = rng.random((50, 7)) < 0.25
    truth[:, 6] = False                                           # a label without members: left out
    ours = average_precision_per_label(scores, truth)
    keep = truth.any(axis=0)
    ref = average_precision_score(truth[:, keep], scores[:, keep], average=None)
    np.testing.assert_allclose(ours[keep], ref, rtol=1e-12)
    assert np.isnan(ours[6])
    m, n = mean_average_precision_per_label(scores, truth)
    assert n == 6 and m == pytest.approx(average_precision_score(truth[:, keep], scores[:, keep], average="macro"))
    # a valid mask equals dropping the left-out (query, label) pairs from that label's ranking
    valid = rng.random(truth.shape) > 0.3
    ours = average_precision_per_label(scores, truth, valid)
    for j in range(6):
        t, s = truth[valid[:, j], j], scores[valid[:, j], j]
        if t.any():
            assert ours[j] == pytest.approx(average_precision_score(t, s), rel=1e-12)


def test_cross_validation_reports_both_maps_with_chance_levels():
    rng = np.random.default_rng(1)
    n, labels = 60, 6
    member = np.zeros((n, labels), bool)
    member[np.arange(n), np.arange(n) % labels] = True
    ls = LabelSet("moa", np.array([f"c{i:02d}" for i in range(n)], dtype=object),
                  np.array([f"m{j}" for j in range(labels)], dtype=object), member)
    profiles = (member @ rng.normal(size=(labels, 30)) * 2 + rng.normal(size=(n, 30))).astype(np.float32)
    res = cross_validate(profiles, ls, np.full(n, "seen"), n_folds=3, k=3, threshold=0.6)
    means = res.groupby("metric")["value"].mean()
    assert {"mAP", "mAP-chance", "mAP-label", "mAP-label-chance"} <= set(means.index)
    # per-label chance ~ label frequency (1/6) << per-query chance (~0.4 with 6 labels)
    assert means["mAP-label-chance"] < means["mAP-chance"] - 0.1
    assert means["mAP-label"] > means["mAP-label-chance"] + 0.3
    assert (res.loc[res["metric"] == "mAP-label", "n_queries"] == labels).all()   # labels averaged


def test_holm_equals_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan, 0.005, 0.04])
    ours = holm_adjust(p)
    ok = np.isfinite(p)
    np.testing.assert_allclose(ours[ok], multipletests(p[ok], method="holm")[1], rtol=1e-12)
    assert np.isnan(ours[4])


def test_paired_tests_equal_scipy_and_holm_per_family():
    rng = np.random.default_rng(2)
    folds = 10
    base = rng.normal(0.6, 0.05, folds)
    values = {"real": base, "c-aware-N10": base + 0.05 + 0.01 * rng.normal(size=folds),
              "non-c-aware-N10": base + 0.01 * rng.normal(size=folds)}
    frame = pd.DataFrame([{"data_type": d, "task": "moa", "query_split": "seen", "metric": "mAP", "fold": f,
                           "value": v[f]} for d, v in values.items() for f in range(folds)])
    out = paired_tests(frame)
    assert len(out) == 3
    for _, r in out.iterrows():
        a, b = values[r["group1"]], values[r["group2"]]
        t = stats.ttest_rel(b, a)
        assert r["p_t"] == pytest.approx(t.pvalue, rel=1e-10) and r["t"] == pytest.approx(t.statistic)
        assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(b, a).pvalue, rel=1e-10)
        ci = t.confidence_interval(0.95)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
        assert r["mean_diff"] == pytest.approx((b - a).mean())
    np.testing.assert_allclose(out["p_t_holm"], multipletests(out["p_t"], method="holm")[1])
    same = paired_difference(base, base)
    assert same["p_t"] == 1.0 and same["p_wilcoxon"] == 1.0 and same["mean_diff"] == 0.0


def test_verdicts_in_words():
    rng = np.random.default_rng(3)
    folds = 10
    base = rng.normal(0.6, 0.05, folds)
    values = {"real": base, "c-aware-N10": base + 0.1 + 0.01 * rng.normal(size=folds),
              "non-c-aware-N10": base - 0.1 + 0.01 * rng.normal(size=folds),
              "real-harmony": base + 0.01 * rng.normal(size=folds)}
    results = pd.DataFrame([{"data_type": d, "task": "moa", "query_split": "seen", "metric": "mAP", "fold": f,
                             "value": v[f]} for d, v in values.items() for f in range(folds)])
    paired, verdict = paired_and_verdicts(results, None)
    got = verdict.set_index(["arm", "versus"])
    assert got.loc[("c-aware-N10", "real"), "verdict"] == "better"
    assert got.loc[("non-c-aware-N10", "real"), "verdict"] == "worse"
    assert got.loc[("c-aware-N10", "non-c-aware-N10"), "verdict"] == "better"
    assert got.loc[("c-aware-N10", "real"), "difference"] == pytest.approx(
        (values["c-aware-N10"] - base).mean())
    assert "real-harmony" not in set(verdict["arm"])
    assert counterpart("oracle-scm-free-N20") == "oracle-c-aware-N20" and counterpart("real") is None
    # identical values -> no difference
    results2 = results.copy()
    results2.loc[results2["data_type"] == "c-aware-N10", "value"] = base
    _, v2 = paired_and_verdicts(results2, None)
    assert v2.set_index(["arm", "versus"]).loc[("c-aware-N10", "real"), "verdict"] == "no difference"


def test_chemistry_nn_equals_brute_force():
    rng = np.random.default_rng(4)
    n, d = 40, 64
    bits = rng.random((n, d)) < 0.2
    bits[5] = bits[6]                                            # a tie: the smaller id wins
    bits[7] = bits[6]
    ids = np.array([f"c{i:02d}" for i in range(n)], dtype=object)[::-1].copy()   # ids not in row order
    seen = rng.random(n) < 0.6
    seen[[5, 6, 7]] = True
    got = nearest_seen_neighbours(ids, bits, seen, chunk=7)
    for i in range(n):
        best, best_id = -1.0, None
        for j in range(n):
            if j == i or not seen[j]:
                continue
            inter = np.sum(bits[i] & bits[j])
            union = np.sum(bits[i] | bits[j])
            s = inter / union if union else 0.0
            if s > best or (s == best and ids[j] < best_id):
                best, best_id = s, ids[j]
        assert got[ids[i]] == best_id
    assert got[ids[5]] == min(ids[6], ids[7])
    sim = tanimoto(bits[:3], bits[:4])
    assert sim[0, 0] == 1.0 and sim.shape == (3, 4)


def test_tukey_equals_statsmodels_pairwise_tukeyhsd():
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    from cpldm_core.evaluation.statistics import tukey_hsd

    rng = np.random.default_rng(5)
    groups = np.repeat(["real", "real-harmony", "c-aware-N10", "chemistry-nn"], [10, 10, 10, 9])
    values = rng.normal(size=len(groups)) + pd.Series(groups).map(
        {"real": 0, "real-harmony": 0.3, "c-aware-N10": 1.0, "chemistry-nn": 0.1}).to_numpy()
    ours = tukey_hsd(values, groups)
    ref = pairwise_tukeyhsd(values, groups)
    np.testing.assert_allclose(ours["meandiff"], ref.meandiffs, rtol=1e-12)
    np.testing.assert_allclose(ours["p_adj"], ref.pvalues, rtol=1e-10)
    np.testing.assert_allclose(ours[["lower", "upper"]].to_numpy(), ref.confint, rtol=1e-10)
    assert ours["reject"].tolist() == list(ref.reject)


def test_paper_table_layout_and_maps_render():
    from cpldm_core.evaluation.report import embedding_figure, paper_table, png_bytes, summarise

    rows = []
    for dt, shift in (("real", 0.0), ("c-aware-N10", 0.1)):
        for split in ("seen", "unseen"):
            for fold in range(3):
                for metric, value in (("mAP", 0.5), ("mAP-label", 0.3), ("ROC-AUC", 0.7), ("mAP-chance", 0.34),
                                      ("mAP-label-chance", 0.12), ("ROC-AUC-chance", 0.5)):
                    rows.append({"data_type": dt, "task": "moa", "query_split": split, "fold": fold,
                                 "metric": metric, "value": value + (shift + 0.01 * fold) * ("chance" not in metric),
                                 "n_queries": 8})
    table = paper_table(summarise(pd.DataFrame(rows)), "moa")
    assert list(table["data type"]) == ["c-aware-N10", "real", "chance (random scores)"]
    assert table.columns[1] == "seen: mAP (per label)"
    assert table.iloc[1]["seen: mAP (per label)"] == "0.310 +- 0.010"
    assert table.iloc[2]["unseen: mAP (per query)"] == "0.340"
    emb = pd.DataFrame({"data_type": np.repeat(["a", "b", "c", "d"], 5), "x": np.arange(20.0), "y": 1.0,
                        "Metadata_moa": "m"})
    assert png_bytes(embedding_figure, emb, "Metadata_moa")[:4] == b"\x89PNG"
