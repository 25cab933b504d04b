"""Figures (matplotlib PNG) and the HTML report of an evaluation run.

Figures: bar charts of mAP and ROC-AUC (mean +- SD over folds) per task x query split with one bar per data
type and the chance level; profile maps (UMAP or PCA) coloured by compound, batch and MoA, one panel per data
type; truth recovery per data type when the simulator's truth is known. Tables: the summary, ANOVA and Tukey
HSD (adjusted p-values), copairs mAP, exclusion counts.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: Colours of the first categories in maps; the rest are drawn grey (too many compounds to tell apart).
MAX_COLOURED = 20
#: Profile maps: panels per row and inches per panel (large enough to see clusters of single compounds).
MAP_COLUMNS = 3
MAP_PANEL_INCHES = 6.0
SUMMARY_METRICS = ("mAP", "mAP-label", "ROC-AUC")
#: What each metric name means, printed under every table that shows them.
METRIC_LEGEND = ("mAP = mean over queries of each query's AP over labels (chance: mAP-chance); "
                 "mAP-label = mean over labels of each label's AP over queries, scikit-learn macro average "
                 "precision, the paper's definition (chance: mAP-label-chance); chance = the same queries "
                 "scored with random numbers.")


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt
    return plt


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over folds per data type x task x split for both mAPs and ROC-AUC (and chance levels).

    Returns:
        DataFrame [data_type, task, query_split, mAP_mean, mAP_sd, mAP-chance_mean, mAP-label_mean,
        mAP-label_sd, mAP-label-chance_mean, ROC-AUC_mean, ROC-AUC_sd, ROC-AUC-chance_mean, n_queries,
        n_labels, n_folds] (columns of metrics absent from ``results`` are left out).
    """
    folds = results[results["fold"] >= 0]
    keys = ["data_type", "task", "query_split"]
    out = None
    for metric in (*SUMMARY_METRICS, *(f"{m}-chance" for m in SUMMARY_METRICS)):
        sub = folds[folds["metric"] == metric].groupby(keys)
        part = sub["value"].agg(["mean", "std"]).rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_sd"})
        if metric.endswith("-chance"):
            part = part[[f"{metric}_mean"]]
        if metric == "mAP":
            part["n_queries"] = sub["n_queries"].mean().round().astype("Int64")
            part["n_folds"] = sub["fold"].nunique()
        if metric == "mAP-label":   # per-label rows count labels in n_queries
            part["n_labels"] = sub["n_queries"].mean().round().astype("Int64")
        out = part if out is None else out.join(part, how="outer")
    if out is None:
        return pd.DataFrame(columns=keys)
    # each mAP next to its own chance level: the two definitions have very different chance levels
    order = [f"{m}{s}" for m in SUMMARY_METRICS for s in ("_mean", "_sd", "-chance_mean")] + [
        "n_queries", "n_labels", "n_folds"]
    return out.reset_index()[keys + [c for c in order if c in out.columns]]


def summarise_recovery(recovery: pd.DataFrame) -> pd.DataFrame:
    """Truth recovery per data type x split: mean and median Pearson r, mean Spearman r, compounds.

    Args:
        recovery: rows [data_type, query_split, pearson_r, spearman_r] (one per compound).
    """
    if recovery is None or not len(recovery):
        return pd.DataFrame()
    return (recovery.groupby(["data_type", "query_split"])
            .agg(pearson_mean=("pearson_r", "mean"), pearson_median=("pearson_r", "median"),
                 spearman_mean=("spearman_r", "mean"), n_compounds=("pearson_r", "count")).reset_index())


def paper_table(summary: pd.DataFrame, task: str) -> pd.DataFrame:
    """The paper's Table 1 (MoA) / Table 2 (targets) layout: one row per data type, columns query split x metric
    as "mean +- SD" over folds, then a chance row.

    Args:
        summary: :func:`summarise` output.
    """
    sub = summary[summary["task"] == task]
    if not len(sub):
        return pd.DataFrame()
    splits = [s for s in ("seen", "unseen") if s in set(sub["query_split"])]
    metrics = [m for m in ("mAP-label", "mAP", "ROC-AUC") if f"{m}_mean" in sub]
    names = {"mAP-label": "mAP (per label)", "mAP": "mAP (per query)", "ROC-AUC": "ROC-AUC"}
    rows = []
    for dt, group in sub.groupby("data_type", sort=True):
        g = group.set_index("query_split")
        row = {"data type": dt}
        for split in splits:
            for m in metrics:
                mean = g[f"{m}_mean"].get(split, np.nan)
                sd = g[f"{m}_sd"].get(split, np.nan)
                row[f"{split}: {names[m]}"] = f"{mean:.3f} +- {sd:.3f}" if np.isfinite(mean) else ""
        rows.append(row)
    chance = {"data type": "chance (random scores)"}
    for split in splits:
        for m in metrics:
            value = sub.loc[sub["query_split"] == split, f"{m}-chance_mean"].mean()
            chance[f"{split}: {names[m]}"] = f"{value:.3f}" if np.isfinite(value) else ""
    return pd.DataFrame([*rows, chance])


def bar_chart(summary: pd.DataFrame, task: str, path_or_buffer) -> None:
    """mAP (per query), mAP-label (per label) and ROC-AUC bars (mean +- SD over folds) for one task: x = query
    split, one bar per data type, dashed = chance level."""
    plt = _plt()
    sub = summary[summary["task"] == task]
    data_types = sorted(sub["data_type"].unique())
    splits = [s for s in ("seen", "unseen") if s in set(sub["query_split"])]
    metrics = [m for m in SUMMARY_METRICS if f"{m}_mean" in sub]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    axes = axes[0]
    width = 0.8 / max(1, len(data_types))
    for ax, metric in zip(axes, metrics):
        for i, dt in enumerate(data_types):
            rows = sub[sub["data_type"] == dt].set_index("query_split").reindex(splits)
            x = np.arange(len(splits)) + (i - (len(data_types) - 1) / 2) * width
            ax.bar(x, rows[f"{metric}_mean"], width, yerr=rows[f"{metric}_sd"].fillna(0), capsize=3, label=dt)
        chance = sub.groupby("query_split")[f"{metric}-chance_mean"].mean().reindex(splits)
        for j, value in enumerate(chance):
            ax.hlines(value, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
        ax.set_xticks(np.arange(len(splits)), splits)
        ax.set_ylabel(f"{metric} (mean +- SD over folds)")
        ax.set_title(f"{task}: {metric} (dashed: chance)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png", dpi=100)
    plt.close(fig)


def embedding_figure(embeddings: pd.DataFrame, colour_by: str, path_or_buffer) -> None:
    """Scatter of the 2-D maps, one panel per data type, coloured by ``colour_by``.

    Args:
        embeddings: rows [data_type, x, y, <colour_by>].
    """
    plt = _plt()
    data_types = sorted(embeddings["data_type"].unique())
    n_cols = min(MAP_COLUMNS, max(1, len(data_types)))
    n_rows = -(-max(1, len(data_types)) // n_cols)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(MAP_PANEL_INCHES * n_cols + 2, MAP_PANEL_INCHES * n_rows),
                             squeeze=False)
    for ax in grid.ravel()[len(data_types):]:
        ax.axis("off")
    axes = [grid.ravel()]
    # one colour per category across all panels: the most frequent categories overall, the rest grey
    top = list(embeddings[colour_by].astype(str).value_counts().index[:MAX_COLOURED])
    cmap = plt.get_cmap("tab20")
    for ax, dt in zip(axes[0], data_types):
        sub = embeddings[embeddings["data_type"] == dt]
        values = sub[colour_by].astype(str)
        rest = ~values.isin(top)
        ax.scatter(sub["x"][rest], sub["y"][rest], s=8, c="lightgrey")
        for k, name in enumerate(top):
            pick = values == name
            ax.scatter(sub["x"][pick], sub["y"][pick], s=12, color=cmap(k % 20), label=name)
        ax.set_title(f"{dt}: {colour_by}")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(data_types) and embeddings[colour_by].nunique() <= MAX_COLOURED:
        axes[0][len(data_types) - 1].legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png", dpi=100)
    plt.close(fig)


def recovery_figure(recovery: pd.DataFrame, path_or_buffer) -> None:
    """Box plot of the per-compound truth recovery (Pearson r with the truth profile) per data type."""
    plt = _plt()
    data_types = sorted(recovery["data_type"].unique())
    fig, ax = plt.subplots(figsize=(1.6 * len(data_types) + 2, 4))
    ax.boxplot([recovery.loc[recovery["data_type"] == dt, "pearson_r"].dropna() for dt in data_types])
    ax.set_xticks(np.arange(1, len(data_types) + 1), data_types, rotation=20)
    ax.set_ylabel("per-compound Pearson r")
    ax.set_title("treatment profile vs interventional truth profile (common features, nothing fitted)")
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png", dpi=100)
    plt.close(fig)


def png_bytes(draw, *args) -> bytes:
    """Run a figure function into memory and return the PNG bytes (the lake writes them)."""
    buffer = io.BytesIO()
    draw(*args, buffer)
    return buffer.getvalue()


def compute_embedding(values: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(n, 2) float32 map of (n, f) profiles: UMAP (umap-learn) or the first two principal components."""
    values = np.asarray(values, dtype=np.float32)
    if len(values) < 4:
        return np.zeros((len(values), 2), dtype=np.float32)
    if method == "umap":
        import umap
        reducer = umap.UMAP(n_neighbors=min(15, len(values) - 1), random_state=seed, n_jobs=1)
        return reducer.fit_transform(values).astype(np.float32)
    from sklearn.decomposition import PCA
    return PCA(n_components=2, random_state=seed).fit_transform(values).astype(np.float32)


@dataclass
class ReportContent:
    """What the HTML page shows. Figures are (title, relative PNG path)."""

    run: str
    summary: pd.DataFrame
    anova: pd.DataFrame
    tukey: pd.DataFrame
    copairs: pd.DataFrame
    exclusions: pd.DataFrame
    recovery: pd.DataFrame | None
    figures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    verdict: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: image gallery (``cpldm gallery``): (title, relative PNG path), shown after the tables of results
    gallery: list[tuple[str, str]] = field(default_factory=list)


def _table(frame: pd.DataFrame, max_rows: int = 200) -> str:
    if frame is None or len(frame) == 0:
        return "<p><i>none</i></p>"
    return frame.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0,
                                        classes="t", na_rep="")


def render_html(content: ReportContent) -> str:
    """A self-contained HTML page (figures referenced as relative ``figures/*.png``)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cpldm evaluation {html.escape(content.run)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table.t{border-collapse:collapse;"
        "font-size:12px}table.t td,table.t th{padding:2px 6px;border-bottom:1px solid #ddd}</style>",
        f"</head><body><h1>cpldm evaluation: {html.escape(content.run)}</h1>",
        "<p>Subprofile nearest-neighbour prediction (Pahl et al. 2023) of MoA and targets; mean and SD over "
        "cross-validation folds that re-draw the reference compounds; queries split into compounds seen and "
        "unseen in training.</p>",
    ]
    for note in content.notes:
        parts.append(f"<p><b>Note:</b> {html.escape(note)}</p>")
    if len(content.verdict):
        parts += ["<h2>Verdict: each generated arm vs real and vs its other arm</h2>",
                  "<p>difference = arm - other (mean over folds; truth: over compounds), 95% CI of the paired mean "
                  "difference, paired-t p Holm-adjusted over all pairs of data types of that task x split x "
                  "metric; better / worse when p_adj < alpha.</p>", _table(content.verdict),
                  f"<p><i>{html.escape(METRIC_LEGEND)}</i></p>"]
    for number, (task, title) in enumerate((("moa", "MoA prediction"), ("target", "target prediction")), 1):
        table = paper_table(content.summary, task)
        if len(table):
            parts += [f"<h2>Table {number}: {title} (mean +- SD over folds)</h2>", _table(table)]
    parts += ["<h2>Summary</h2>", _table(content.summary), f"<p><i>{html.escape(METRIC_LEGEND)}</i></p>"]
    for title, rel in content.figures:
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(rel)}' style='max-width:100%'>")
    if content.gallery:
        parts += ["<h2>Image gallery (real vs generated cells)</h2>",
                  "<p>Composites: DNA blue, ER green, RNA cyan, AGP red, Mito magenta; one contrast per channel "
                  "per figure. Generated rows show the same draw (noise seed, batch, well) of each run; the "
                  "oracle row of the conditions figure renders every condition from one seed "
                  "(<a href='gallery/README.md'>gallery/README.md</a>).</p>"]
        for title, rel in content.gallery:
            parts.append(f"<h3>{html.escape(title)}</h3><a href='{html.escape(rel)}'><img src='{html.escape(rel)}' "
                         "style='max-width:100%'></a>")
    parts += ["<h2>Paired comparisons (identical folds; truth: identical compounds)</h2>",
              "<p>paired t and Wilcoxon signed-rank (scipy), Holm-adjusted; diff = group2 - group1.</p>",
              _table(content.paired, max_rows=400),
              "<h2>One-way ANOVA across data types (folds treated as independent: the paper's layout)</h2>",
              _table(content.anova),
              "<h2>Tukey HSD (adjusted p-values)</h2>", _table(content.tukey),
              "<h2>copairs mAP (activity vs DMSO, consistency within MoA)</h2>", _table(content.copairs)]
    if content.recovery is not None and len(content.recovery):
        parts += ["<h2>Truth recovery (interventional truth profiles)</h2>",
                  "<p>Per compound, Pearson and Spearman correlation between its treatment profile and its "
                  "truth profile on the features selected on the truth dataset, both DMSO-normalised per "
                  "plate/draw; nothing is fitted per data type.</p>", _table(summarise_recovery(content.recovery))]
    if len(content.exclusions):
        counts = content.exclusions.groupby(["task", "reason"]).size().rename("compounds").reset_index()
        parts += ["<h2>Excluded compounds</h2>", _table(counts)]
    parts.append("</body></html>")
    return "\n".join(parts)
