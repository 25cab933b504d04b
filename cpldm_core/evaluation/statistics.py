"""One-way ANOVA and Tukey HSD across data types (statsmodels), per task x query split x metric.

The observations are the fold values (n_folds per data type), as in the paper's figures.
"""
from __future__ import annotations

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


def tukey_hsd(values: np.ndarray, groups: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """statsmodels ``pairwise_tukeyhsd``: one row per pair [group1, group2, meandiff, p_adj, lower, upper,
    reject] (meandiff = mean(group2) - mean(group1))."""
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    result = pairwise_tukeyhsd(np.asarray(values, dtype=float), np.asarray(groups).astype(str), alpha=alpha)
    data = result._results_table.data
    frame = pd.DataFrame(data[1:], columns=data[0])
    frame = frame.rename(columns={"p-adj": "p_adj"})
    # the summary table rounds its numbers; take the exact ones (same pair order)
    frame["p_adj"] = np.asarray(result.pvalues, dtype=float)
    frame["meandiff"] = np.asarray(result.meandiffs, dtype=float)
    frame["lower"] = np.asarray(result.confint, dtype=float)[:, 0]
    frame["upper"] = np.asarray(result.confint, dtype=float)[:, 1]
    frame["reject"] = np.asarray(result.reject, dtype=bool)
    return frame[["group1", "group2", "meandiff", "p_adj", "lower", "upper", "reject"]].astype(
        {"meandiff": float, "lower": float, "upper": float, "reject": bool})


def compare_data_types(results: pd.DataFrame, metrics: tuple[str, ...] = ("mAP", "ROC-AUC"),
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
