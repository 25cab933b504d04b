"""Evaluation results: one row per (data type, task, query split, fold, metric)."""
import pyarrow as pa

from storage_schemas.columns import FEATURE_COLUMNS
from storage_schemas.spec import TableSpec, register

EVAL_RESULTS = register(TableSpec(
    name="eval_results",
    path="eval",  # eval/run=<run>/results.parquet
    partitioning=("run",),
    description="mAP / ROC-AUC per data type x task x seen/unseen x fold",
    schema=pa.schema([
        pa.field("run", pa.string()),
        pa.field("data_type", pa.string(), nullable=False),   # real | real-harmony | c-aware-N10 | ...
        pa.field("task", pa.string(), nullable=False),        # moa | target
        pa.field("query_split", pa.string(), nullable=False), # seen | unseen
        pa.field("fold", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),      # mAP (per query) | mAP-label (per label) | ROC-AUC | ...
        pa.field("value", pa.float64()),
        pa.field("n_queries", pa.int32()),
    ]),
))


def _run_table(name: str, description: str, fields: list[pa.Field]) -> TableSpec:
    # Not under eval/: pyarrow's hive discovery of eval/ (eval_results) would also pick up any other Parquet
    # file below it and merge the schemas. eval_tables/<name>/run=<run>/<part>.parquet keeps tables apart.
    return register(TableSpec(name=name, path=f"eval_tables/{name.removeprefix('eval_')}",
                              partitioning=("run",), description=description,
                              schema=pa.schema([pa.field("run", pa.string()), *fields])))


_KEYS = [pa.field("task", pa.string(), nullable=False), pa.field("query_split", pa.string(), nullable=False),
         pa.field("metric", pa.string(), nullable=False)]

EVAL_SUMMARY = _run_table("eval_summary", "mean and SD over folds per data type x task x split", [
    pa.field("data_type", pa.string(), nullable=False), _KEYS[0], _KEYS[1],
    pa.field("mAP_mean", pa.float64()), pa.field("mAP_sd", pa.float64()),            # per-query AP
    pa.field("mAP-label_mean", pa.float64()), pa.field("mAP-label_sd", pa.float64()),  # per-label AP (macro)
    pa.field("ROC-AUC_mean", pa.float64()), pa.field("ROC-AUC_sd", pa.float64()),
    pa.field("mAP-chance_mean", pa.float64()), pa.field("mAP-label-chance_mean", pa.float64()),
    pa.field("ROC-AUC-chance_mean", pa.float64()),
    pa.field("n_queries", pa.int64()), pa.field("n_labels", pa.int64()), pa.field("n_folds", pa.int64()),
])

EVAL_ANOVA = _run_table("eval_anova", "one-way ANOVA across data types per task x split x metric", [
    *_KEYS, pa.field("F", pa.float64()), pa.field("p_value", pa.float64()),
    pa.field("df_between", pa.float64()), pa.field("df_within", pa.float64()),
])

EVAL_TUKEY = _run_table("eval_tukey", "Tukey HSD between data types (adjusted p-values)", [
    *_KEYS, pa.field("group1", pa.string(), nullable=False), pa.field("group2", pa.string(), nullable=False),
    pa.field("meandiff", pa.float64()), pa.field("p_adj", pa.float64()), pa.field("lower", pa.float64()),
    pa.field("upper", pa.float64()), pa.field("reject", pa.bool_()),
])

EVAL_PAIRED = _run_table("eval_paired", "paired t and Wilcoxon between every pair of data types over identical "
                         "folds (truth: compounds), Holm-adjusted per task x split x metric; diff = group2 - group1", [
    *_KEYS, pa.field("group1", pa.string(), nullable=False), pa.field("group2", pa.string(), nullable=False),
    pa.field("n_pairs", pa.int64()), pa.field("mean_diff", pa.float64()), pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()), pa.field("t", pa.float64()), pa.field("p_t", pa.float64()),
    pa.field("p_wilcoxon", pa.float64()), pa.field("p_t_holm", pa.float64()),
    pa.field("p_wilcoxon_holm", pa.float64()),
])

EVAL_VERDICT = _run_table("eval_verdict", "each generated arm vs real and vs its counterpart arm: difference "
                          "(arm - other), 95% CI, Holm-adjusted paired-t p, verdict in words", [
    pa.field("arm", pa.string(), nullable=False), pa.field("versus", pa.string(), nullable=False), *_KEYS,
    pa.field("arm_mean", pa.float64()), pa.field("versus_mean", pa.float64()), pa.field("difference", pa.float64()),
    pa.field("ci_low", pa.float64()), pa.field("ci_high", pa.float64()), pa.field("p_adj", pa.float64()),
    pa.field("verdict", pa.string(), nullable=False), pa.field("n_pairs", pa.int64()),
])

EVAL_EXCLUSIONS = _run_table("eval_exclusions", "compounds left out of a task, one reason each", [
    pa.field("Metadata_JCP2022", pa.string(), nullable=False), pa.field("task", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])

EVAL_COPAIRS = _run_table("eval_copairs", "copairs mAP per compound (activity) or MoA (consistency)", [
    pa.field("data_type", pa.string(), nullable=False), pa.field("analysis", pa.string(), nullable=False),
    pa.field("query_split", pa.string()), pa.field("group", pa.string(), nullable=False),
    pa.field("mean_average_precision", pa.float64()), pa.field("corrected_p_value", pa.float64()),
    pa.field("below_corrected_p", pa.bool_()),
])

EVAL_TRUTH_RECOVERY = _run_table(
    "eval_truth_recovery", "per compound: Pearson and Spearman r of its treatment profile with its truth profile "
    "(common truth-selected features, same normalisation, nothing fitted)", [
        pa.field("data_type", pa.string(), nullable=False),
        pa.field("Metadata_JCP2022", pa.string(), nullable=False),
        pa.field("query_split", pa.string()), pa.field("pearson_r", pa.float64()),
        pa.field("spearman_r", pa.float64()),
    ])

#: Interventional truth: treatment profiles of the features dataset ``truth`` (DMSO MAD normalisation per
#: plate = draw, mean per compound), on the features the recipe selects on it (the common feature set).
TRUTH_PROFILES = register(TableSpec(
    name="truth_profiles", path="eval_tables/truth_profiles", partitioning=("run",),
    description="treatment-level truth profiles (DMSO robust SD units) on the common truth-selected features",
    schema=pa.schema([pa.field("run", pa.string()), pa.field("Metadata_JCP2022", pa.string(), nullable=False)]),
    extra_columns=FEATURE_COLUMNS, extra_type=pa.float32(),
))

EVAL_EMBEDDING = _run_table("eval_embedding", "2-D map (UMAP/PCA) of well-level profiles for the report", [
    pa.field("data_type", pa.string(), nullable=False), pa.field("x", pa.float32()), pa.field("y", pa.float32()),
    pa.field("Metadata_JCP2022", pa.string()), pa.field("Metadata_Source", pa.string()),
    pa.field("Metadata_Batch", pa.string()), pa.field("Metadata_moa", pa.string()),
])


def _profiles_table(name: str, description: str) -> TableSpec:
    # one file per (run, data type): feature columns differ between data types (each has its own selection)
    return register(TableSpec(
        name=name, path=f"eval_tables/{name}", partitioning=("run", "data_type"), description=description,
        schema=pa.schema([pa.field("run", pa.string()), pa.field("data_type", pa.string()),
                          pa.field("Metadata_Source", pa.string()), pa.field("Metadata_Batch", pa.string()),
                          pa.field("Metadata_Plate", pa.string()), pa.field("Metadata_Well", pa.string()),
                          pa.field("Metadata_JCP2022", pa.string(), nullable=False),
                          pa.field("Metadata_pert_type", pa.string())]),
        extra_columns=FEATURE_COLUMNS, extra_type=pa.float32()))


#: Well-level profiles after the variant-feature, MAD-vs-DMSO and outlier steps (the JUMP recipe's
#: ``*_normalized`` output; DMSO robust SD units; NaN kept).
PROFILES_NORMALIZED = _profiles_table(
    "profiles_normalized", "well-level profiles per data type after variant features, MAD vs DMSO and outliers")
#: ... then pycytominer feature selection (and Harmony for *-harmony data types): the recipe's
#: ``*_mad_featselect`` output, exactly what the subprofile evaluation averages per compound.
PROFILES_FEATSELECT = _profiles_table(
    "profiles_featselect", "well-level profiles per data type after feature selection (and Harmony)")
