"""Aggregation levels against naive loops: image = median over cells, well = mean over sites (or one draw),
treatment = mean over wells."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cpldm_core.features import aggregate


def _images(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ("P1", "P2"):
        for well, jcp in (("A01", "JCP2022_033924"), ("A02", "JCP2022_000001"), ("A03", "JCP2022_000001")):
            for site in range(3):
                rows.append({"Metadata_Source": "source_1", "Metadata_Batch": "B1", "Metadata_Plate": plate,
                             "Metadata_Well": well, "Metadata_JCP2022": jcp, "Metadata_pert_type": "trt",
                             "Metadata_Draw": -1, "Metadata_Site": site,
                             "Cells_AreaShape_Area": rng.normal(100, 10), "Nuclei_Intensity_MeanIntensity_DNA":
                             np.nan if site == 0 and well == "A03" else rng.random()})
    return pd.DataFrame(rows).astype({"Cells_AreaShape_Area": np.float32,
                                      "Nuclei_Intensity_MeanIntensity_DNA": np.float32})


def test_well_and_treatment_means_match_a_loop():
    images = _images()
    wells = aggregate.well_from_images(images)
    feats = ["Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]
    assert aggregate.feature_columns(wells) == feats
    for _, w in wells.iterrows():
        sites = [r for _, r in images.iterrows()
                 if (r.Metadata_Plate, r.Metadata_Well) == (w.Metadata_Plate, w.Metadata_Well)]
        assert w.Metadata_SiteCount == len(sites) == 3
        for f in feats:
            values = [float(s[f]) for s in sites if not np.isnan(s[f])]   # NaN sites (no cells) are skipped
            np.testing.assert_allclose(w[f], sum(values) / len(values), rtol=1e-6)
    treatments = aggregate.treatment_from_wells(wells)
    assert treatments["Metadata_WellCount"].tolist() == [4, 2]              # sorted: JCP2022_000001 first
    for _, t in treatments.iterrows():
        members = wells[wells.Metadata_JCP2022 == t.Metadata_JCP2022]
        for f in feats:
            np.testing.assert_allclose(t[f], sum(members[f].astype(float)) / len(members), rtol=1e-6)


def test_synthetic_draws_stay_separate_and_null_keys_survive():
    images = _images().head(6).assign(Metadata_Draw=[0, 1, 2, 0, 1, 2], Metadata_pert_type=None)
    wells = aggregate.well_from_images(images)
    # same well and compound but different draws: separate "wells"
    assert len(wells) == 6 and (wells["Metadata_SiteCount"] == 1).all()
    assert wells["Metadata_pert_type"].isna().all()


def test_image_is_median_over_cells():
    rng = np.random.default_rng(3)
    cells = pd.DataFrame({"Metadata_SiteKey": np.repeat(["a", "b"], [5, 4]),
                          "Cells_AreaShape_Area": rng.random(9).astype(np.float32)})
    image = aggregate.image_from_cells(cells, ["Metadata_SiteKey"])
    assert image["Metadata_CellCount"].tolist() == [5, 4]
    np.testing.assert_allclose(image["Cells_AreaShape_Area"],
                               [np.median(cells.Cells_AreaShape_Area[:5]), np.median(cells.Cells_AreaShape_Area[5:])],
                               rtol=1e-6)
