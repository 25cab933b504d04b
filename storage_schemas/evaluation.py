"""Evaluation results: one row per (data type, task, query split, fold, metric)."""
import pyarrow as pa

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
        pa.field("metric", pa.string(), nullable=False),      # mAP | ROC-AUC | ...
        pa.field("value", pa.float64()),
        pa.field("n_queries", pa.int32()),
    ]),
))
