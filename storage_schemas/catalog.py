"""Catalog tables: one row per 5-channel site, one row per compound, and the train/held-out split."""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

SITES = register(TableSpec(
    name="sites",
    path="catalog/sites.parquet",
    description="one row per 5-channel image set (site) with its channel URIs and all Metadata_*",
    schema=pa.schema([
        c.SITE_KEY, c.SOURCE, c.BATCH, c.PLATE, c.WELL, c.SITE,
        pa.field("Metadata_PlateType", pa.string()),
        c.JCP2022, c.INCHIKEY, c.SMILES, c.PERT_TYPE,
        *[pa.field(f"URL_Orig{ch}", pa.string(), nullable=False) for ch in c.CHANNELS],
        *[pa.field(f"URL_Illum{ch}", pa.string()) for ch in c.CHANNELS],
    ]),
))

COMPOUNDS = register(TableSpec(
    name="compounds",
    path="catalog/compounds.parquet",
    description="one row per compound (JCP2022 id, InChIKey, SMILES, perturbation type)",
    schema=pa.schema([c.JCP2022, c.INCHIKEY, c.SMILES, c.PERT_TYPE]),
))

SPLIT_COMPOUNDS = register(TableSpec(
    name="split_compounds",
    path="catalog/split_compounds.parquet",
    description="per compound: 'seen' (may be trained on) or 'unseen' (held out of training entirely)",
    schema=pa.schema([c.JCP2022, pa.field("Metadata_CompoundSplit", pa.string(), nullable=False)]),
))

SPLIT_BATCHES = register(TableSpec(
    name="split_batches",
    path="catalog/split_batches.parquet",
    description="per batch: 'train' or 'heldout' (images of seen compounds never trained on)",
    schema=pa.schema([c.SOURCE, c.BATCH, pa.field("Metadata_BatchSplit", pa.string(), nullable=False)]),
))
