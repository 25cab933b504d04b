"""Rejected input rows: every input that did not reach a stage's output, with the reason."""
import pyarrow as pa

from storage_schemas.spec import TableSpec, register

REJECTS = register(TableSpec(
    name="rejects",
    path="rejects",  # rejects/stage=<stage>/part-<unit>.parquet
    partitioning=("stage",),
    description="inputs a stage could not use: which file/row, and why",
    schema=pa.schema([
        pa.field("stage", pa.string()),
        pa.field("unit", pa.string(), nullable=False),     # unit of work (plate, block, ...)
        pa.field("item", pa.string(), nullable=False),     # file URI, row key or compound id
        pa.field("reason", pa.string(), nullable=False),
    ]),
))
