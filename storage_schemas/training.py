"""Training history of a model run."""
import pyarrow as pa

from storage_schemas.spec import TableSpec, register

TRAIN_HISTORY = register(TableSpec(
    name="train_history",
    path="models",  # models/run=<run>/history.parquet
    partitioning=("run",),
    description="loss per optimiser step (train) and per validation pass (val, held-out batches)",
    schema=pa.schema([
        pa.field("run", pa.string()),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),   # train | val
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("samples_per_s", pa.float64()),
    ]),
))
