"""Statistics across data types, per task x query split x metric.

* One-way ANOVA and Tukey HSD (statsmodels) over fold values, kept for the paper's table layout. They treat
  folds as independent samples, which they are not: folds only re-draw the references on fixed profiles.
* Paired comparisons (what the verdict uses): every fold re-draws the *same* references for every data type
  (same seed, same label set), so fold f of data type A and fold f of B form a pair; per pair of data types,
  paired t (scipy ``ttest_rel``) and Wilcoxon signed-rank (scipy ``wilcoxon``), Holm-adjusted over the pairs
  of one (task, split, metric) family. Truth recovery pairs compounds instead of folds.
* Verdicts: each generated arm vs ``real`` and vs its counterpart arm, in words.
Fold-level tests say nothing about retraining variance (another training seed moves synthetic mAP by ~0.1):
that needs replicate runs.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

ANOVA_COLUMNS = ["task", "query_split", "metric", "F", "p_value", "df_between", "df_within"]
TUKEY_COLUMNS = ["task", "query_split", "metric", "group1", "group2", "meandiff", "p_adj", "lower", "upper",
                 "reject"]


def one_way_anova(values: np.ndarray, groups: np.ndarray) -> dict:
    """statsmodels OLS ``value ~ C(group)`` + type-II ANOVA table. Returns F, p_value, dfs."""
    import statsmodels.api as sm
    from statsmodels.formula.api import ols

    frame = pd.DataFrame({"value": np.asarray(values, dtype=float), "group": np.asarray(groups).astype(str)})
    table = sm.stats.anova_lm(ols("value ~ C(group)", data=frame).fit(), typ=2)
    return {"F": float(table.loc["C(group)", "F"]), "p_value": float(table.loc["C(group)", "PR(>F)"]),
            "df_between": float(table.loc["C(group)", "df"]), "df_within": float(table.loc["Residual", "df"])}


@functools.lru_cache(maxsize=64)
def _tukey_qcrit(k: int, df: float, alpha: float) -> float:
    """Studentized-range critical value (scipy ppf by numerical integration, ~1 s): every family of one run has
    the same number of data types and folds, so it is computed once per (k, df, alpha)."""
    from scipy.stats import studentized_range
    return float(studentized_range.ppf(1 - alpha, k, df))


def tukey_hsd(values: np.ndarray, groups: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Tukey-Kramer HSD exactly as statsmodels ``pairwise_tukeyhsd`` (its ``tukeyhsd`` core, the critical value
    cached): one row per pair [group1, group2, meandiff, p_adj, lower, upper, reject]
    (meandiff = mean(group2) - mean(group1), groups sorted)."""
    from statsmodels.sandbox.stats.multicomp import tukeyhsd

    values = np.asarray(values, dtype=float)
    groups = np.asarray(groups).astype(str)
    names, inverse = np.unique(groups, return_inverse=True)
    nobs = np.bincount(inverse).astype(float)
    means = np.bincount(inverse, weights=values) / nobs
    var = float(((values - means[inverse]) ** 2).sum() / (len(values) - len(names)))
    qcrit = _tukey_qcrit(len(names), float(len(values) - len(names)), float(alpha))
    (idx1, idx2), reject, meandiffs, _, confint, _, _, _, pvalues = tukeyhsd(
        means, nobs, var, df=None, alpha=alpha, q_crit=qcrit)
    return pd.DataFrame({"group1": names[idx1], "group2": names[idx2], "meandiff": np.asarray(meandiffs, float),
                         "p_adj": np.asarray(pvalues, float), "lower": np.asarray(confint, float)[:, 0],
                         "upper": np.asarray(confint, float)[:, 1], "reject": np.asarray(reject, bool)})


def compare_data_types(results: pd.DataFrame, metrics: tuple[str, ...] = ("mAP", "mAP-label", "ROC-AUC"),
                       alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ANOVA and Tukey tables over data types for every (task, query_split, metric).

    Args:
        results: rows [data_type, task, query_split, fold, metric, value] (fold >= 0 rows are used).

    Returns:
        (anova DataFrame ``ANOVA_COLUMNS``, tukey DataFrame ``TUKEY_COLUMNS``). Groups of fewer than two data
        types (or with no variance at all) are skipped.
    """
    anova_rows, tukey_frames = [], []
    frame = results[(results["fold"] >= 0) & results["metric"].isin(metrics)].dropna(subset=["value"])
    for (task, split, metric), group in frame.groupby(["task", "query_split", "metric"], sort=True):
        if group["data_type"].nunique() < 2 or group.groupby("data_type").size().min() < 2:
            continue
        if np.ptp(group["value"].to_numpy()) == 0:
            continue
        key = {"task": task, "query_split": split, "metric": metric}
        anova_rows.append({**key, **one_way_anova(group["value"], group["data_type"])})
        tukey = tukey_hsd(group["value"], group["data_type"], alpha)
        tukey_frames.append(tukey.assign(**key))
    anova = pd.DataFrame(anova_rows, columns=ANOVA_COLUMNS)
    tukey = (pd.concat(tukey_frames, ignore_index=True)[TUKEY_COLUMNS] if tukey_frames
             else pd.DataFrame(columns=TUKEY_COLUMNS))
    return anova, tukey


# ---------------------------------------------------------------------------------------------- paired tests
#: Columns of the paired comparison table (one row per family x pair; diff = group2 - group1).
PAIRED_COLUMNS = ["task", "query_split", "metric", "group1", "group2", "n_pairs", "mean_diff", "ci_low", "ci_high",
                  "t", "p_t", "p_wilcoxon", "p_t_holm", "p_wilcoxon_holm"]
VERDICT_COLUMNS = ["arm", "versus", "task", "query_split", "metric", "arm_mean", "versus_mean", "difference",
                   "ci_low", "ci_high", "p_adj", "verdict", "n_pairs"]


def holm_adjust(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries stay NaN and do not count in the family).

    Equal to ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]`` (checked in tests).
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])   # step-down: never below a smaller p's
    out[order] = np.minimum(adjusted, 1.0)
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """Paired comparison of ``b`` against ``a`` over the same units (folds or compounds).

    Returns:
        dict n_pairs, mean_diff (mean of b - a), ci_low/ci_high (t interval of the mean difference), t and
        p_t (scipy ``ttest_rel(b, a)``), p_wilcoxon (scipy ``wilcoxon(b, a)``; 1.0 when every difference is 0,
        NaN with fewer than 2 pairs).
    """
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    d = b - a
    n = len(d)
    out = {"n_pairs": n, "mean_diff": float(d.mean()) if n else float("nan"), "ci_low": float("nan"),
           "ci_high": float("nan"), "t": float("nan"), "p_t": float("nan"), "p_wilcoxon": float("nan")}
    if n < 2:
        return out
    if np.all(d == 0):   # identical values: no evidence of a difference (scipy would return NaN / raise)
        return {**out, "ci_low": 0.0, "ci_high": 0.0, "t": 0.0, "p_t": 1.0, "p_wilcoxon": 1.0}
    test = stats.ttest_rel(b, a)
    ci = test.confidence_interval(confidence)
    out.update(t=float(test.statistic), p_t=float(test.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    out["p_wilcoxon"] = float(stats.wilcoxon(b, a).pvalue)
    return out


def paired_tests(frame: pd.DataFrame, unit: str = "fold", confidence: float = 0.95) -> pd.DataFrame:
    """Paired t and Wilcoxon between every pair of data types, over identical units, Holm-adjusted per family.

    A family is one (task, query_split, metric): all its pairs are adjusted together. Units (folds re-drawing
    the same references for every data type; or compounds) present in both data types are paired.

    Args:
        frame: rows [data_type, task, query_split, metric, <unit>, value].

    Returns:
        DataFrame ``PAIRED_COLUMNS`` (diff = group2 - group1, groups in sorted order).
    """
    rows = []
    for (task, split, metric), group in frame.dropna(subset=["value"]).groupby(
            ["task", "query_split", "metric"], sort=True):
        wide = group.pivot_table(index=unit, columns="data_type", values="value", aggfunc="mean")
        names = sorted(wide.columns)
        family = []
        for i, g1 in enumerate(names):
            for g2 in names[i + 1:]:
                pair = wide[[g1, g2]].dropna()
                family.append({"task": task, "query_split": split, "metric": metric, "group1": g1, "group2": g2,
                               **paired_difference(pair[g1].to_numpy(), pair[g2].to_numpy(), confidence)})
        if family:
            fam = pd.DataFrame(family)
            fam["p_t_holm"] = holm_adjust(fam["p_t"])
            fam["p_wilcoxon_holm"] = holm_adjust(fam["p_wilcoxon"])
            rows.append(fam)
    return pd.concat(rows, ignore_index=True)[PAIRED_COLUMNS] if rows else pd.DataFrame(columns=PAIRED_COLUMNS)


def counterpart(arm: str) -> str | None:
    """The other arm of a generated data type: c-aware-N10 <-> non-c-aware-N10, oracle-c-aware-N10 <->
    oracle-scm-free-N10 (run suffixes kept); None for anything else."""
    for a, b in (("oracle-c-aware-", "oracle-scm-free-"), ("non-c-aware-", "c-aware-")):
        if arm.startswith(a):
            return b + arm[len(a):]
        if arm.startswith(b):
            return a + arm[len(b):]
    return None


def verdicts(paired: pd.DataFrame, means: pd.DataFrame, arms: list[str], reference: str = "real",
             alpha: float = 0.05) -> pd.DataFrame:
    """Each arm vs ``reference`` and vs its counterpart: difference (arm - other), 95 % CI, Holm-adjusted
    paired-t p and a verdict in words (``better`` / ``no difference`` / ``worse`` at ``alpha``).

    Args:
        paired: :func:`paired_tests` output. means: [data_type, task, query_split, metric, value] mean per
            data type. arms: generated data types to judge.
    """
    keys = ["task", "query_split", "metric"]
    mean_of = means.set_index(["data_type", *keys])["value"]
    rows = []
    for arm in arms:
        for other in (reference, counterpart(arm)):
            if other is None or other == arm:
                continue
            for _, r in paired[((paired["group1"] == arm) & (paired["group2"] == other))
                               | ((paired["group1"] == other) & (paired["group2"] == arm))].iterrows():
                sign = 1.0 if r["group2"] == arm else -1.0   # paired diffs are group2 - group1
                lo, hi = sorted((sign * r["ci_low"], sign * r["ci_high"]))
                diff, p = sign * r["mean_diff"], r["p_t_holm"]
                verdict = ("no difference" if not (p < alpha) else "better" if diff > 0 else "worse")
                key = (r["task"], r["query_split"], r["metric"])
                rows.append({"arm": arm, "versus": other, "task": key[0], "query_split": key[1], "metric": key[2],
                             "arm_mean": mean_of.get((arm, *key), np.nan),
                             "versus_mean": mean_of.get((other, *key), np.nan), "difference": diff,
                             "ci_low": lo, "ci_high": hi, "p_adj": p, "verdict": verdict,
                             "n_pairs": int(r["n_pairs"])})
    out = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    # reading order: per arm, vs real first; MoA, target, truth; the paper's mAP (per label) first
    rank = {m: i for i, m in enumerate(("mAP-label", "mAP", "ROC-AUC", "truth-pearson", "truth-spearman"))}
    order = out.assign(_v=out["versus"] != reference, _t=out["task"].map({"moa": 0, "target": 1}).fillna(2),
                       _m=out["metric"].map(rank).fillna(len(rank)))
    return out.loc[order.sort_values(["arm", "_v", "versus", "_t", "query_split", "_m"], kind="stable").index
                   ].reset_index(drop=True)


#: Fold metrics compared pairwise (both mAP definitions and ROC-AUC).
PAIRED_METRICS = ("mAP", "mAP-label", "ROC-AUC")
#: Generated data types judged in the verdict table (prefixes).
ARM_PREFIXES = ("c-aware-", "non-c-aware-", "oracle-c-aware-", "oracle-scm-free-")


def paired_and_verdicts(results: pd.DataFrame, recovery: pd.DataFrame | None, reference: str = "real",
                        alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests over folds (both mAPs, ROC-AUC) and over compounds (truth recovery), and the verdicts.

    Args:
        results: rows [data_type, task, query_split, fold, metric, value] (fold >= 0 rows are used).
        recovery: rows [data_type, Metadata_JCP2022, query_split, pearson_r, spearman_r] or None.

    Returns:
        (paired ``PAIRED_COLUMNS``, verdicts ``VERDICT_COLUMNS``); truth rows have task ``truth`` and metric
        ``truth-pearson`` / ``truth-spearman``.
    """
    folds = results[(results["fold"] >= 0) & results["metric"].isin(PAIRED_METRICS)]
    folds = folds[["data_type", "task", "query_split", "metric", "fold", "value"]].rename(columns={"fold": "unit"})
    frames = [folds]
    if recovery is not None and len(recovery):
        long = recovery.melt(id_vars=["data_type", "Metadata_JCP2022", "query_split"],
                             value_vars=["pearson_r", "spearman_r"], var_name="metric", value_name="value")
        long["metric"] = long["metric"].map({"pearson_r": "truth-pearson", "spearman_r": "truth-spearman"})
        frames.append(long.rename(columns={"Metadata_JCP2022": "unit"}).assign(task="truth"))
    paired = pd.concat([paired_tests(f, unit="unit") for f in frames if len(f)] or
                       [pd.DataFrame(columns=PAIRED_COLUMNS)], ignore_index=True)
    means = pd.concat([f.groupby(["data_type", "task", "query_split", "metric"])["value"].mean().reset_index()
                       for f in frames if len(f)] or [pd.DataFrame(columns=["data_type", "task", "query_split",
                                                                             "metric", "value"])])
    names = sorted(set(folds["data_type"]))
    arms = [d for d in names if d.startswith(ARM_PREFIXES)]
    return paired, verdicts(paired, means, arms, reference, alpha)
