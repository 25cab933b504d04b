"""Feature tables at four levels, hive-partitioned by dataset (``real`` or a synthetic run)."""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

_DATASET = pa.field("dataset", pa.string())
_DRAW = pa.field("Metadata_Draw", pa.int32())  # synthetic only: the g-estimation draw; null for real images


def _features(name: str, description: str, fields: list[pa.Field], extra: str = c.FEATURE_COLUMNS) -> TableSpec:
    return register(TableSpec(
        name=name,
        path=f"features/{name.removeprefix('features_')}",  # features/<level>/dataset=<d>/part-*.parquet
        partitioning=("dataset",),
        description=description,
        schema=pa.schema([_DATASET, *fields]),
        extra_columns=extra,
        extra_type=pa.float32(),
    ))


FEATURES_SINGLE_CELL = _features(
    "features_single_cell", "one row per segmented cell (optional, large)",
    [c.SITE_KEY, c.SOURCE, c.BATCH, c.PLATE, c.WELL, c.SITE, c.JCP2022, c.PERT_TYPE, _DRAW,
     pa.field("Metadata_ObjectNumber", pa.int32(), nullable=False)],
)
FEATURES_IMAGE = _features(
    "features_image", "one row per image: median over its cells, cell count and quality flags",
    [c.SITE_KEY, c.SOURCE, c.BATCH, c.PLATE, c.WELL, c.SITE, c.JCP2022, c.PERT_TYPE, _DRAW,
     pa.field("Metadata_CellCount", pa.int32(), nullable=False),
     pa.field("Metadata_QCFlags", pa.string())],
)
FEATURES_WELL = _features(
    "features_well", "one row per well (real) or per draw (synthetic): mean over sites",
    [c.SOURCE, c.BATCH, c.PLATE, c.WELL, c.JCP2022, c.PERT_TYPE, _DRAW,
     pa.field("Metadata_SiteCount", pa.int32(), nullable=False)],
    # optional: the dose of imported profiles (`profile import --dose-col`, unit of the source file); absent otherwise
    extra=rf"{c.FEATURE_COLUMNS}|Metadata_dose",
)
FEATURES_TREATMENT = _features(
    "features_treatment", "one row per compound: mean over replicate wells (real) or draws (synthetic)",
    [c.JCP2022, c.PERT_TYPE, pa.field("Metadata_WellCount", pa.int32(), nullable=False)],
)
