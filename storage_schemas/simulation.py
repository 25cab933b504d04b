"""Tables the simulator writes beside the JUMP-shaped raw layout: annotations and ground truth.

Truth columns (cpldm_core.simulate.world): per compound ``Truth_<phenotype>`` for the 14 phenotype dimensions
(NucleusArea, NucleusIntensity, NucleusTexture, CellArea, CellElongation, ERIntensity, ERTexture,
MitoIntensity, MitoGranularity, AGPIntensity, AGPMembrane, RNAIntensity, Nucleoli, CellCount; standard units,
DMSO = 0); per (source, batch) ``Truth_Gain_<channel>``, ``Truth_SourceBlur``, ``Truth_Background``,
``Truth_ReadNoise``, ``Truth_IllumAmplitude``, ``Truth_IllumCentreX/Y``, ``Truth_CellDensity``,
``Truth_CellSize``, ``Truth_EdgeIntensity``, ``Truth_EdgeDensity``, and the within-plate gradients
``Truth_GradRow_<channel>``, ``Truth_GradCol_<channel>`` (log-intensity from the plate centre to its last
row/column), ``Truth_GradCurve`` (log-intensity at a corner vs the centre), ``Truth_DensityGradRow/Col``
(log cell density, same convention). The positivity statistics of the plate maps are ``simulation_positivity``.
"""
import pyarrow as pa

from storage_schemas import columns as c
from storage_schemas.spec import TableSpec, register

ANNOTATIONS_MOA = register(TableSpec(
    name="annotations_moa",
    path="raw/annotations/moa.parquet",
    description="single-label mechanism of action per compound",
    schema=pa.schema([c.JCP2022, c.INCHIKEY, pa.field("Metadata_moa", pa.string(), nullable=False)]),
))

ANNOTATIONS_TARGET = register(TableSpec(
    name="annotations_target",
    path="raw/annotations/target.parquet",
    description="multi-label targets, one row per (compound, target)",
    schema=pa.schema([c.JCP2022, c.INCHIKEY, pa.field("Metadata_target", pa.string(), nullable=False)]),
))

TRUTH_COMPOUNDS = register(TableSpec(
    name="truth_compounds",
    path="raw/truth/compound_phenotypes.parquet",
    description="simulator ground truth: true phenotype shift per compound (Truth_* columns, standard units; "
                "Metadata_moa null for DMSO)",
    schema=pa.schema([c.JCP2022, pa.field("Metadata_moa", pa.string())]),
    extra_columns=r"Truth_.+",
    extra_type=pa.float64(),
))

TRUTH_CONFOUNDERS = register(TableSpec(
    name="truth_confounders",
    path="raw/truth/confounder_effects.parquet",
    description="simulator ground truth: per source/batch confounder effects (Truth_* columns)",
    schema=pa.schema([c.SOURCE, c.BATCH]),
    extra_columns=r"Truth_.+",
    extra_type=pa.float64(),
))

SIMULATION_POSITIVITY = register(TableSpec(
    name="simulation_positivity",
    path="raw/positivity.parquet",
    description="positivity of the simulated plate maps: distinct compounds per (batch, well) and (source, "
                "well) (median, mean, max), share of treatments screened in more than one source",
    schema=pa.schema([pa.field("statistic", pa.string(), nullable=False), pa.field("value", pa.float64())]),
))
