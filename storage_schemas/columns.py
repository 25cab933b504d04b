"""JUMP column names shared by several tables (cpg0016 spelling, ``Metadata_`` prefix)."""
import pyarrow as pa

SOURCE = pa.field("Metadata_Source", pa.string(), nullable=False)      # "source_1"
BATCH = pa.field("Metadata_Batch", pa.string(), nullable=False)        # "2021_04_26_Batch1"
PLATE = pa.field("Metadata_Plate", pa.string(), nullable=False)        # always a string, even "110000295571"
WELL = pa.field("Metadata_Well", pa.string(), nullable=False)          # "A01"
SITE = pa.field("Metadata_Site", pa.int32(), nullable=False)           # as numbered by the source (0- or 1-based)
JCP2022 = pa.field("Metadata_JCP2022", pa.string(), nullable=False)    # "JCP2022_033924" (DMSO)
INCHIKEY = pa.field("Metadata_InChIKey", pa.string())
SMILES = pa.field("Metadata_SMILES", pa.string())
PERT_TYPE = pa.field("Metadata_pert_type", pa.string())                # trt | negcon | poscon | empty
SITE_KEY = pa.field("Metadata_SiteKey", pa.string(), nullable=False)   # "<source>/<batch>/<plate>/<well>/<site>"

#: The compound-id column name (``JCP2022.name``), used as a plain string by the evaluation code.
COMPOUND = JCP2022.name

#: DMSO negative control id in JUMP (metadata/README.md of jump-cellpainting/datasets).
DMSO_JCP2022 = "JCP2022_033924"

#: The five Cell Painting channels in the order used throughout cpldm: (C=5) axis of every image array.
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")

#: Feature column pattern (CellProfiler naming: <Compartment>_<Module>_<Measure>[_<Channel>...]).
FEATURE_COLUMNS = r"(Cells|Nuclei|Cytoplasm|Image)_.+"
