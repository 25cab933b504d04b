"""g-estimation design and the manifest of generated images.

Row numbering: design rows are ``treatment_index * N + draw`` (treatments sorted), then the DMSO rows
``n_treatments * N + draw * dmso_per_draw + replicate`` (``cpldm_core.design``), and the image of design row
``r`` is row ``r`` of ``synthetic/<run>/images.zarr`` (``Metadata_ImageRow == Metadata_DesignRow``).
Both tables are written one Parquet part per unit: ``part-<first block>`` for the design (parts of many
blocks), ``block-<block>`` for the manifest.
"""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

_DESIGN_FIELDS = [
    pa.field("run", pa.string()),
    pa.field("Metadata_DesignRow", pa.int64(), nullable=False),  # see the module docstring
    pa.field("Metadata_Block", pa.int64(), nullable=False),      # unit of work committed as a whole
    c.JCP2022,
    pa.field("Metadata_Draw", pa.int32(), nullable=False),       # i = 0..N-1; the synthetic plate draw-000i
    pa.field("Metadata_Replicate", pa.int32(), nullable=False),  # DMSO image k = 0..dmso_per_draw-1 of draw i; 0 else
    c.SOURCE, c.BATCH, c.WELL,                                   # drawn confounders (uniform over training values)
    pa.field("Metadata_Seed", pa.int64(), nullable=False),       # noise seed: int63 hash of (namespace, key, i[, k])
]

GENERATION_DESIGN = register(TableSpec(
    name="generation_design",
    path="synthetic_design",  # synthetic_design/run=<run>/part-<first block>.parquet
    partitioning=("run",),
    description="one row per image to generate: compound x draw with its confounder draw and seed",
    schema=pa.schema(_DESIGN_FIELDS),
))

SYNTHETIC_MANIFEST = register(TableSpec(
    name="synthetic_manifest",
    path="synthetic_manifest",  # synthetic_manifest/run=<run>/block-<block>.parquet
    partitioning=("run",),
    description="one row per generated image: design row, its row in images.zarr, model and sampler",
    schema=pa.schema(_DESIGN_FIELDS + [
        pa.field("Metadata_ImageRow", pa.int64(), nullable=False),
        pa.field("Metadata_Model", pa.string(), nullable=False),       # model run (models/<run>/)
        pa.field("Metadata_ModelKind", pa.string(), nullable=False),   # scm | scm-free | oracle-c-aware | oracle-scm-free
        pa.field("Metadata_Sampler", pa.string(), nullable=False),     # ddim | dpm++
        pa.field("Metadata_SamplerSteps", pa.int32(), nullable=False),
        pa.field("Metadata_GuidanceScale", pa.float32(), nullable=False),
    ]),
))

CONFOUNDER_SUPPORT = register(TableSpec(
    name="confounder_support",
    path="confounder_support",  # confounder_support/model=<model run>/support.parquet, written by `cpldm train`
    partitioning=("model",),
    description="p'(C): (source, batch, well) observed with treatments in a model's training data",
    schema=pa.schema([pa.field("model", pa.string()), c.SOURCE, c.BATCH, c.WELL]),
))
