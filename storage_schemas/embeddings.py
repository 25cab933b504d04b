"""Compound embeddings, one table per encoder (``embeddings/<encoder_id>.parquet``)."""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

EMBEDDINGS = register(TableSpec(
    name="embeddings",
    path="embeddings",  # embeddings/encoder=<encoder_id>/part-*.parquet
    partitioning=("encoder",),
    description="pooled compound embedding per (encoder, compound), keyed by JCP2022 id and InChIKey",
    schema=pa.schema([
        pa.field("encoder", pa.string()),
        c.JCP2022, c.INCHIKEY,
        pa.field("Metadata_CanonicalSMILES", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]),
))
