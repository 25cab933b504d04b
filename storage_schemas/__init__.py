"""Lake tables, Zarr layouts and path layout of cpldm.

One Arrow schema per table (``TABLES``), validated on write with :func:`validate`.
Imports pyarrow only, so every layer can depend on it.
"""
from storage_schemas.spec import SCHEMA_VERSION, SchemaError, TableSpec, problems, validate
from storage_schemas import catalog as _catalog  # noqa: F401  (registers tables)
from storage_schemas import simulation as _simulation  # noqa: F401
from storage_schemas import latents as _latents  # noqa: F401
from storage_schemas import embeddings as _embeddings  # noqa: F401
from storage_schemas import training as _training  # noqa: F401
from storage_schemas import generation as _generation  # noqa: F401
from storage_schemas import features as _features  # noqa: F401
from storage_schemas import evaluation as _evaluation  # noqa: F401
from storage_schemas import rejects as _rejects  # noqa: F401
from storage_schemas.spec import TABLES, table_spec
from storage_schemas.zarr_layouts import ZARR_LAYOUTS, ZarrLayout

__all__ = [
    "SCHEMA_VERSION", "SchemaError", "TableSpec", "TABLES", "table_spec", "validate", "problems",
    "ZARR_LAYOUTS", "ZarrLayout",
]
