"""Dose-aware not-same-compound (NSC) scoring against a naive loop, treatments from a dose column, and the
warnings that explain (label thresholds with counts, a Harmony batch key confounded with compounds)."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpldm_core.evaluation.config import preset
from cpldm_core.evaluation.crossval import cross_validate, score_fold
from cpldm_core.evaluation.harmony import single_batch_fraction
from cpldm_core.evaluation.labels import LabelSet, threshold_report
from cpldm_core.evaluation.recipe import evaluate_wells, expand_to_treatments, treatment_keys
from cpldm_core.evaluation.subprofiles import EMPTY_SCORE
from storage_schemas.columns import DMSO_JCP2022


def test_nsc_scores_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    n_compounds, doses, f = 12, 3, 25
    groups = np.repeat([f"c{i:02d}" for i in range(n_compounds)], doses)
    profiles = (rng.normal(size=(n_compounds, f))[np.arange(n_compounds).repeat(doses)]
                + 0.5 * rng.normal(size=(len(groups), f))).astype(np.float32)
    references = [np.array([0, 1, 4]), np.array([9, 13, 20]), np.array([30, 31, 32])]  # c00 twice; c10 only
    threshold = 0.6
    got = score_fold(profiles, references, threshold, groups)
    for q in range(len(groups)):
        for j, refs in enumerate(references):
            rest = [r for r in refs if groups[r] != groups[q]]        # never another dose of the query's compound
            if not rest:
                assert got[q, j] == EMPTY_SCORE
                continue
            ref = profiles[rest].astype(np.float64)
            share = np.maximum((np.sign(ref) > 0).mean(axis=0), (np.sign(ref) < 0).mean(axis=0))
            mask = share > threshold
            if mask.sum() < 2:
                assert got[q, j] == EMPTY_SCORE
                continue
            expected = stats.pearsonr(profiles[q, mask], np.median(ref, axis=0)[mask])[0]
            assert got[q, j] == pytest.approx(expected, abs=1e-5), (q, j)
    # without groups, a same-compound reference is used: scores of c00's other doses differ
    plain = score_fold(profiles, references, threshold)
    assert not np.allclose(plain[2, 0], got[2, 0])


def test_dose_column_makes_treatments_and_nsc_lowers_same_compound_advantage():
    """Each compound at 3 doses: its doses look alike (compound identity), MoA signal weak. With same-compound
    references the MoA mAP is inflated; the dose-aware evaluation (NSC) removes that inflation."""
    rng = np.random.default_rng(1)
    n_compounds, n_moa, doses, f = 24, 4, 3, 30
    moa = np.arange(n_compounds) % n_moa
    compound_effect = 0.4 * rng.normal(size=(n_moa, f))[moa] + 1.5 * rng.normal(size=(n_compounds, f))
    rows, values = [], []
    for c in range(n_compounds):
        for d in (0.1, 1.0, 10.0):
            for _ in range(2):
                rows.append((f"JCP2022_{c:06d}", d, "trt"))
                values.append(compound_effect[c] + 0.3 * rng.normal(size=f))
    for _ in range(16):
        rows.append((DMSO_JCP2022, np.nan, "negcon"))
        values.append(0.3 * rng.normal(size=f))
    meta = pd.DataFrame(rows, columns=["Metadata_JCP2022", "Metadata_dose", "Metadata_pert_type"])
    meta = meta.assign(Metadata_Source="s", Metadata_Batch="b", Metadata_Plate="p", Metadata_Well="w")
    values = np.asarray(values, np.float32) + 10.0
    keys, compound_of = treatment_keys(meta, (meta["Metadata_pert_type"] == "negcon").to_numpy())
    assert keys[0] == "JCP2022_000000@0.1" and compound_of["JCP2022_000000@10"] == "JCP2022_000000"
    ids = np.array([f"JCP2022_{c:06d}" for c in range(n_compounds)], dtype=object)
    member = np.zeros((n_compounds, n_moa), bool)
    member[np.arange(n_compounds), moa] = True
    labels = {"moa": LabelSet("moa", ids, np.array([f"m{k}" for k in range(n_moa)], dtype=object), member)}
    treatments = np.array(sorted(set(keys) - {DMSO_JCP2022}), dtype=object)
    expanded = expand_to_treatments(labels["moa"], treatments, compound_of)
    assert len(expanded.compounds) == n_compounds * doses and expanded.membership.sum() == n_compounds * doses
    cfg = preset("tiny", n_references=3, n_folds=3, copairs=False, embedding="pca", feature_ops=())
    out = evaluate_wells(meta, values, [f"Cells_F{j}" for j in range(f)], labels, cfg)
    assert list(out.compounds) == list(treatments)
    assert "dose-aware-treatments-nsc" in set(out.results["metric"])
    got = out.results[(out.results["metric"] == "mAP") & (out.results["fold"] >= 0)]["value"].to_numpy()
    groups = np.array([compound_of[t] for t in treatments], dtype=object)
    split = np.full(len(treatments), "seen")
    nsc = cross_validate(out.profiles, expanded, split, 3, 3, cfg.sign_consistency, groups=groups)
    same = cross_validate(out.profiles, expanded, split, 3, 3, cfg.sign_consistency)
    np.testing.assert_allclose(got, nsc[nsc["metric"] == "mAP"]["value"].to_numpy())
    # another dose of the query's own compound as a reference inflates the score; NSC removes it
    assert same[same["metric"] == "mAP"]["value"].mean() > nsc[nsc["metric"] == "mAP"]["value"].mean() + 0.1


def test_threshold_report_counts_labels():
    ann = pd.DataFrame({"Metadata_JCP2022": list("abcdefgh"),
                        "Metadata_moa": ["m1", "m1", "m1", "m2", "m2", "m3", "m1|m2", None]})
    message, warn = threshold_report(ann, list("abcdefgh"), "moa", 3, paper_min=10)
    assert message.startswith("moa: 1 of 3 labels have >= 3 compounds") and "at the paper's >= 10: 0" in message
    assert "3 in 2 smaller labels dropped" in message and warn


def test_single_batch_fraction_counts_confounded_compounds():
    meta = pd.DataFrame({"Metadata_JCP2022": ["a", "a", "b", "b", "c", DMSO_JCP2022],
                         "Metadata_Batch": ["w1", "w1", "w1", "w2", "w2", "w1"],
                         "Metadata_Source": "s"})
    control = (meta["Metadata_JCP2022"] == DMSO_JCP2022).to_numpy()
    naive = np.mean([meta[(meta["Metadata_JCP2022"] == c)]["Metadata_Batch"].nunique() == 1 for c in "abc"])
    assert single_batch_fraction(meta, control, "batch") == pytest.approx(naive) == pytest.approx(2 / 3)
    assert single_batch_fraction(meta, control, "source") == 1.0
