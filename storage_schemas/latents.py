"""Latent cache index: maps each row of ``latents/<vae_id>/latents.zarr`` to its site metadata."""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

LATENT_INDEX = register(TableSpec(
    name="latent_index",
    path="latents/index",  # latents/index/vae=<vae_id>/part-<plate>.parquet
    partitioning=("vae",),
    description="one row per encoded crop: its row in latents.zarr and the site's metadata",
    schema=pa.schema([
        pa.field("vae", pa.string()),
        pa.field("Metadata_LatentRow", pa.int64(), nullable=False),
        c.SITE_KEY, c.SOURCE, c.BATCH, c.PLATE, c.WELL, c.SITE, c.JCP2022, c.PERT_TYPE,
        pa.field("Metadata_Crop", pa.int32(), nullable=False),
    ]),
))
