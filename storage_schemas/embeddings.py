"""Compound embeddings, one hive partition per encoder (``embeddings/encoder=<encoder_id>/part-*.parquet``).

Layout of one encoder's cache (see ``pipelines/embed.py``):

- ``embeddings/encoder=<id>/part-<hash>.parquet``: table ``embeddings``, one row per compound, appended
  part by part (a rerun adds parts for compounds not yet cached; parts are never rewritten).
- ``embeddings/<id>/config.json``: the encoder settings that made the vectors (a rerun with other settings
  under the same id is refused).
- ``embeddings/<id>/tokens.zarr`` (MolT5 only): array ``tokens`` (rows, T, D) float16 and ``mask`` (rows, T)
  bool; row ``Metadata_TokenRow`` of the table. Rows are allocated per unit in chunk-aligned blocks, so the
  array can hold unused (all-zero, mask False) rows; read through the table's row index, never by position.
"""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

#: Row of a compound in ``embeddings/<encoder_id>/tokens.zarr``; null for encoders without tokens (Morgan).
TOKEN_ROW = pa.field("Metadata_TokenRow", pa.int64())

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
        TOKEN_ROW,
    ]),
))

#: Zarr arrays inside ``embeddings/<encoder_id>/tokens.zarr``.
TOKENS_ARRAY = "tokens"   # (rows, T, D) float16, zeros at padding
MASK_ARRAY = "mask"       # (rows, T) bool, True = real token
