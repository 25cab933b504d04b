"""g-estimation design and the manifest of generated images."""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

_DESIGN_FIELDS = [
    pa.field("run", pa.string()),
    c.JCP2022,
    pa.field("Metadata_Draw", pa.int32(), nullable=False),     # i = 0..N-1
    c.SOURCE, c.BATCH, c.WELL,
    pa.field("Metadata_Seed", pa.int64(), nullable=False),     # noise seed derived from (run, compound, draw)
    pa.field("Metadata_Block", pa.int64(), nullable=False),    # unit of work committed as a whole
]

GENERATION_DESIGN = register(TableSpec(
    name="generation_design",
    path="synthetic_design",  # synthetic_design/run=<run>/part-<block>.parquet
    partitioning=("run",),
    description="one row per image to generate: compound x draw with its confounder draw and seed",
    schema=pa.schema(_DESIGN_FIELDS),
))

SYNTHETIC_MANIFEST = register(TableSpec(
    name="synthetic_manifest",
    path="synthetic_manifest",  # synthetic_manifest/run=<run>/part-<block>.parquet
    partitioning=("run",),
    description="one row per generated image: design row, its row in images.zarr, model and sampler",
    schema=pa.schema(_DESIGN_FIELDS + [
        pa.field("Metadata_ImageRow", pa.int64(), nullable=False),
        pa.field("Metadata_Model", pa.string(), nullable=False),
        pa.field("Metadata_Sampler", pa.string(), nullable=False),
        pa.field("Metadata_SamplerSteps", pa.int32(), nullable=False),
        pa.field("Metadata_GuidanceScale", pa.float32(), nullable=False),
    ]),
))
