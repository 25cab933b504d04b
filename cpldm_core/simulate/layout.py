"""JUMP (cpg0016) naming and file layout of the simulated lake.

Paths are lake-relative; the pipeline turns them into full URIs. The layout is the Cell Painting Gallery's::

    raw/<source>/images/<batch>/images/<plate>/Images/rXXcYYfZZp01-chNsk1fk1fl1.tiff
    raw/<source>/workspace/load_data_csv/<batch>/<plate>/load_data.csv
    raw/metadata/{plate,well,compound}.csv.gz, channel_mapping.csv, perturbation_control.csv
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from storage_schemas.columns import CHANNELS

#: Root of everything the simulator writes, relative to the lake.
RAW = "raw"

#: Channel number (``chN`` in file names) of each stain, per real JUMP source, from
#: jump-cellpainting/datasets metadata/channel_mapping.csv (commit 181fa0dc, 2023-01-23), columns
#: Metadata_Channel_Num_{DNA,ER,RNA,AGP,Mito}. Simulated ``source_k`` uses real source k's mapping.
JUMP_CHANNEL_MAPPING: dict[int, tuple[int, int, int, int, int]] = {
    1: (4, 1, 2, 5, 3), 2: (1, 2, 3, 4, 5), 3: (5, 4, 3, 2, 1), 4: (5, 4, 3, 2, 1), 5: (1, 2, 3, 4, 5),
    6: (1, 2, 3, 4, 5), 7: (1, 4, 3, 5, 2), 8: (5, 4, 3, 2, 1), 9: (4, 1, 5, 3, 2), 10: (1, 2, 3, 4, 5),
    11: (1, 2, 4, 3, 5), 13: (1, 4, 3, 5, 2),
}
#: Brightfield columns of JUMP's channel_mapping.csv (kept, left empty: the simulator images no brightfield).
BRIGHTFIELD_COLUMNS = ("Metadata_Channel_Num_BFLowest", "Metadata_Channel_Num_BFMedium",
                       "Metadata_Channel_Num_BFHighest")
CHANNEL_MAPPING_COLUMNS = ("Metadata_Source", *[f"Metadata_Channel_Num_{c}" for c in CHANNELS],
                           *BRIGHTFIELD_COLUMNS)

#: load_data.csv columns written by the simulator (the subset of cpg0016's that every consumer uses).
LOAD_DATA_COLUMNS = (*[f"URL_Orig{c}" for c in CHANNELS], "Metadata_Source", "Metadata_Batch",
                     "Metadata_Plate", "Metadata_Well", "Metadata_Site")

#: First simulated batch date; batches follow weekly (JUMP batch names are ``YYYY_MM_DD_BatchN``).
FIRST_BATCH_DATE = dt.date(2021, 4, 26)


@dataclass(frozen=True)
class PlateId:
    """One simulated plate and where it sits in the source/batch hierarchy (all indices 0-based)."""

    source_index: int
    batch_index: int        # within the source
    plate_index: int        # within the batch
    global_batch_index: int

    @property
    def source(self) -> str:
        return source_name(self.source_index)

    @property
    def batch(self) -> str:
        date = FIRST_BATCH_DATE + dt.timedelta(days=7 * self.global_batch_index)
        return f"{date:%Y_%m_%d}_Batch{self.batch_index + 1}"

    @property
    def plate(self) -> str:
        # JUMP barcodes look like BR00117035; encode source/batch/plate so names are unique lake-wide
        return f"BR{self.source_index + 1:02d}{self.global_batch_index + 1:03d}{self.plate_index + 1:03d}"


def source_name(index: int) -> str:
    return f"source_{index + 1}"


def channel_numbers(source_index: int) -> tuple[int, int, int, int, int]:
    """``chN`` numbers of (DNA, ER, RNA, AGP, Mito) for a simulated source (cycles the real sources)."""
    real = sorted(JUMP_CHANNEL_MAPPING)
    return JUMP_CHANNEL_MAPPING[real[source_index % len(real)]]


def well_name(row: int, col: int) -> str:
    """0-based row/column -> ``A01`` (rows past Z continue ``AA``, ``AB`` as on 1536-well plates)."""
    letters = chr(ord("A") + row) if row < 26 else "A" + chr(ord("A") + row - 26)
    return f"{letters}{col + 1:02d}"


def image_name(row: int, col: int, site: int, channel_number: int) -> str:
    """Opera Phenix file name: 1-based row/column/field, one plane, e.g. ``r01c01f01p01-ch5sk1fk1fl1.tiff``."""
    return f"r{row + 1:02d}c{col + 1:02d}f{site:02d}p01-ch{channel_number}sk1fk1fl1.tiff"


def image_dir(p: PlateId) -> str:
    return f"{RAW}/{p.source}/images/{p.batch}/images/{p.plate}/Images"


def load_data_path(p: PlateId) -> str:
    return f"{RAW}/{p.source}/workspace/load_data_csv/{p.batch}/{p.plate}/load_data.csv"


METADATA_DIR = f"{RAW}/metadata"
PLATE_CSV = f"{METADATA_DIR}/plate.csv.gz"
WELL_CSV = f"{METADATA_DIR}/well.csv.gz"
COMPOUND_CSV = f"{METADATA_DIR}/compound.csv.gz"
CHANNEL_MAPPING_CSV = f"{METADATA_DIR}/channel_mapping.csv"
PERTURBATION_CONTROL_CSV = f"{METADATA_DIR}/perturbation_control.csv"
SIMULATION_JSON = f"{RAW}/simulation.json"
PREVIEW_PNG = f"{RAW}/preview.png"


def plate_ids(n_sources: int, batches_per_source: int, plates_per_batch: int) -> list[PlateId]:
    """All plates, source-major; batch dates interleave sources, as JUMP sources ran in parallel."""
    out = []
    for s in range(n_sources):
        for b in range(batches_per_source):
            for p in range(plates_per_batch):
                out.append(PlateId(s, b, p, global_batch_index=b * n_sources + s))
    return out
