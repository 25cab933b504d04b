"""`cpldm profile import`: bring your own CellProfiler / pycytominer / JUMP profiles in one command.

The JUMP-MOA plate (tests/data, see SOURCE.md) is imported with one command and no glue, then `cpldm evaluate`
on it equals a naive pandas / scikit-learn / pycytominer computation of the documented recipe, fold by fold.
A CellProfiler-style table (``Image_Metadata_*`` keys) with a separate platemap, a dose and a negative-control
query lands in the same tables as the direct import; bad input is a one-line error."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from conftest import shared_path
from cpldm_core.errors import UserError
from cpldm_core.features.aggregate import feature_columns
from pipelines.cli import main
from pipelines.lake_commands import validate_lake
from pipelines.profile_import import ImportOptions, dataset_is_imported, dataset_is_normalized, import_profiles
from storage_schemas.columns import DMSO_JCP2022

JUMP_MOA = Path(__file__).parent / "data" / "jump_moa_BR00117060a10x_normalized_feature_select_negcon.csv.gz"
#: tiny evaluation: every JUMP-MOA MoA has 2 compounds, so 1 reference + 1 query per MoA and fold.
EVAL_SETTINGS = ["--preset", "tiny", "--set", "min_compounds_moa=2", "--set", "min_compounds_target=2",
                 "--set", "n_references=1", "--set", "n_folds=3", "--set", "concurrency=0", "--set", "copairs=false",
                 "--set", "report=false"]


def _read(lake, table: str, dataset: str | None = None) -> pd.DataFrame:
    frame = lake.read_named(table).to_pandas()
    if dataset is not None:
        frame = frame[frame["dataset"].astype(str) == dataset]
    return frame.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- naive recipe
def _naive_fold_maps(source: pd.DataFrame, n_folds: int, k: int, threshold: float, seed: int, outlier: float
                     ) -> list[float]:
    """The documented recipe on an already normalised plate, written out with pandas, pycytominer and sklearn:
    outlier drop/clip -> pycytominer feature_select -> mean per compound -> per fold, K references per MoA drawn
    with default_rng([seed, fold]) -> subprofiles (majority sign share > threshold, median) -> Pearson on the
    subprofile's features -> AP per non-reference query (sklearn) -> mean."""
    from pycytominer import feature_select

    feats = [c for c in source.columns if c.startswith(("Cells_", "Nuclei_", "Cytoplasm_", "Image_"))]
    x = source[feats].astype(np.float64)
    high = x.abs().quantile(0.99)
    x = x.loc[:, high <= outlier].clip(-outlier, outlier)
    x = feature_select(x, features=list(x.columns), operation=["variance_threshold", "correlation_threshold",
                                                              "drop_na_columns"], na_cutoff=0.05, corr_threshold=0.9)
    control = source["Metadata_control_type"].eq("negcon")
    treated = x[~control].copy().assign(c=source.loc[~control, "Metadata_broad_sample"])
    profiles = treated.groupby("c").mean().sort_index()
    moa = source[~control].groupby("Metadata_broad_sample")["Metadata_moa"].first()
    sizes = moa.value_counts()
    moa = moa[moa.isin(sizes[sizes >= 2].index)].sort_index()
    compounds = list(moa.index)
    labels = sorted(moa.unique())
    prof = profiles.loc[compounds].to_numpy()
    maps = []
    for fold in range(n_folds):
        rng = np.random.default_rng([seed, fold])
        refs = {}
        for label in labels:
            members = np.array([i for i, c in enumerate(compounds) if moa[c] == label])
            refs[label] = np.sort(rng.choice(members, size=min(k, len(members)), replace=False))
        used = {int(i) for r in refs.values() for i in r}
        aps = []
        for q in range(len(compounds)):
            if q in used:
                continue
            scores = []
            for label in labels:
                ref = prof[refs[label]]
                share = np.maximum((np.sign(ref) > 0).mean(axis=0), (np.sign(ref) < 0).mean(axis=0))
                mask = share > threshold
                if mask.sum() < 2 or np.std(prof[q, mask]) == 0:
                    scores.append(-2.0)
                    continue
                scores.append(np.corrcoef(prof[q, mask], np.median(ref, axis=0)[mask])[0, 1])
            aps.append(average_precision_score([label == moa[compounds[q]] for label in labels], scores))
        maps.append(float(np.mean(aps)))
    return maps


def test_jump_moa_plate_one_command_then_evaluate_equals_naive_recipe(local_lake, capsys):
    uri = local_lake.uri
    assert main(["--lake", uri, "profile", "import", str(JUMP_MOA), "--dataset", "jumpmoa", "--normalized"]) == 0
    printed = capsys.readouterr().out
    assert "wells=376" in printed and "compounds=90" in printed and "controls=24" in printed
    assert validate_lake(local_lake) == {}
    assert dataset_is_imported(local_lake, "jumpmoa") and dataset_is_normalized(local_lake, "jumpmoa")

    source = pd.read_csv(JUMP_MOA)
    wells = _read(local_lake, "features_well", "jumpmoa").sort_values("Metadata_Well").reset_index(drop=True)
    source = source.sort_values("Metadata_Well").reset_index(drop=True)
    feats = feature_columns(wells)
    assert len(feats) == 357
    np.testing.assert_array_equal(wells[feats].to_numpy(np.float32), source[feats].to_numpy(np.float32))
    negcon = source["Metadata_control_type"].eq("negcon").to_numpy()
    assert (wells["Metadata_pert_type"].to_numpy() == np.where(negcon, "negcon", "trt")).all()
    assert (wells.loc[negcon, "Metadata_JCP2022"] == DMSO_JCP2022).all()  # DMSO wells have no broad_sample
    assert (wells.loc[~negcon, "Metadata_JCP2022"] == source.loc[~negcon, "Metadata_broad_sample"]).all()
    compounds = _read(local_lake, "compounds").set_index("Metadata_JCP2022")
    first = source[~negcon].groupby("Metadata_broad_sample").first()
    for lake_col, file_col in (("Metadata_InChIKey", "Metadata_InChIKey"), ("Metadata_SMILES", "Metadata_smiles")):
        # a few JUMP-MOA compounds ("Compound1" ...) have neither: kept as nulls
        assert compounds.loc[first.index, lake_col].fillna("").tolist() == first[file_col].fillna("").tolist()
    moa = _read(local_lake, "annotations_moa").set_index("Metadata_JCP2022")["Metadata_moa"]
    assert moa.to_dict() == first["Metadata_moa"].to_dict()

    assert main(["--lake", uri, "evaluate", *EVAL_SETTINGS, "--run", "byo"]) == 0
    results = _read(local_lake, "eval_results")
    got = results[(results["run"] == "byo") & (results["data_type"] == "jumpmoa") & (results["task"] == "moa")
                  & (results["metric"] == "mAP") & (results["query_split"] == "seen")].sort_values("fold")
    expected = _naive_fold_maps(source, n_folds=3, k=1, threshold=0.85, seed=0, outlier=100.0)
    assert got["fold"].tolist() == [0, 1, 2]
    assert (got["n_queries"] == 43).all()  # 43 MoAs with 2 compounds: one reference, one query each
    np.testing.assert_allclose(got["value"].to_numpy(), expected, rtol=0, atol=1e-9)


def test_prenormalised_table_without_flag_gives_results_or_one_line_error(local_lake, capsys):
    uri = local_lake.uri
    assert main(["--lake", uri, "profile", "import", str(JUMP_MOA), "--dataset", "plate"]) == 0
    assert not dataset_is_normalized(local_lake, "plate")
    capsys.readouterr()
    code = main(["--lake", uri, "evaluate", *EVAL_SETTINGS])
    err = capsys.readouterr().err.strip()
    assert code in (0, 2)
    if code == 2:
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("cpldm evaluate: error:")


def _cellprofiler_style(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    """A CellProfiler-style well table (``Image_Metadata_*`` keys, features only; Parquet) and a pycytominer
    platemap (no prefix, compound/dose/MoA/target/SMILES; CSV.gz) cut out of 40 wells of the JUMP-MOA plate."""
    source = pd.read_csv(JUMP_MOA).iloc[:40].copy()
    source["dose"] = np.where(source["Metadata_control_type"].eq("negcon"), np.nan,
                              np.tile([0.1, 1.0, 10.0, 3.0], 10))
    source["compound"] = source["Metadata_pert_iname"]
    feats = feature_columns(source)
    table = source[["Metadata_Plate", "Metadata_Well", *feats]].rename(columns={
        "Metadata_Plate": "Image_Metadata_Plate", "Metadata_Well": "Image_Metadata_Well"})
    table.insert(2, "Image_Metadata_Week", "Week1")
    profiles = tmp_path / "wells.parquet"
    table.to_parquet(profiles)
    platemap = pd.DataFrame({"well_position": source["Metadata_Well"], "compound": source["compound"],
                             "dose": source["dose"], "moa": source["Metadata_moa"],
                             "target": np.where(source.index % 2 == 0, "T1|T2", "T3"),
                             "smiles": source["Metadata_smiles"]})
    path = tmp_path / "platemap.csv.gz"
    platemap.to_csv(path, index=False)
    return profiles, path, source


def test_cellprofiler_table_with_platemap_dose_negcon_and_labels(local_lake, tmp_path):
    profiles, platemap, source = _cellprofiler_style(tmp_path)
    options = ImportOptions(platemap=str(platemap), compound_col="compound", dose_col="dose",
                            negcon="Metadata_compound == 'DMSO'", batch_col="Image_Metadata_Week",
                            moa_col="moa", target_col="target")
    summary = import_profiles(local_lake, str(profiles), "cp", options=options)
    assert summary["wells"] == 40 and summary["dose_col"] == "Metadata_dose"
    assert validate_lake(local_lake) == {}
    wells = _read(local_lake, "features_well", "cp").sort_values("Metadata_Well").reset_index(drop=True)
    source = source.sort_values("Metadata_Well").reset_index(drop=True)
    feats = feature_columns(source)
    assert feature_columns(wells) == feats  # Image_Metadata_* became metadata, not Image_ features
    np.testing.assert_array_equal(wells[feats].to_numpy(np.float32), source[feats].to_numpy(np.float32))
    negcon = source["compound"].eq("DMSO").to_numpy()
    assert negcon.any() and (wells["Metadata_pert_type"].to_numpy() == np.where(negcon, "negcon", "trt")).all()
    assert wells["Metadata_JCP2022"].tolist() == source["compound"].tolist()
    np.testing.assert_array_equal(wells["Metadata_dose"].to_numpy(), source["dose"].to_numpy(np.float32))
    assert set(wells["Metadata_Batch"]) == {"Week1"} and set(wells["Metadata_Source"]) == {"cp"}
    compounds = _read(local_lake, "compounds").set_index("Metadata_JCP2022")
    assert compounds.loc["DMSO", "Metadata_pert_type"] == "negcon"
    treated = source[~negcon].groupby("compound").first()
    assert compounds.loc[treated.index, "Metadata_SMILES"].fillna("").tolist() == \
        treated["Metadata_smiles"].fillna("").tolist()
    assert compounds.loc[treated.index, "Metadata_InChIKey"].isna().all()  # the platemap has none
    targets = _read(local_lake, "annotations_target")
    expected = {(c, t) for c, s in zip(source.loc[~negcon, "compound"], np.where(source.index % 2 == 0, "T1|T2",
                                                                                 "T3")[~negcon])
                for t in s.split("|")}
    assert set(zip(targets["Metadata_JCP2022"], targets["Metadata_target"])) == expected
    moa = _read(local_lake, "annotations_moa").set_index("Metadata_JCP2022")["Metadata_moa"]
    assert "DMSO" not in moa.index and moa.to_dict() == treated["Metadata_moa"].to_dict()


def test_profiles_read_from_s3(s3_lake, tmp_path):
    import boto3

    profiles, platemap, source = _cellprofiler_style(tmp_path)
    bucket = s3_lake.bucket
    client = boto3.client("s3", endpoint_url=s3_lake.endpoint_url)
    client.upload_file(str(profiles), bucket, "inbox/wells.parquet")
    uri = f"s3://{bucket}/inbox/wells.parquet"
    assert main(["--lake", s3_lake.uri, "--endpoint-url", s3_lake.endpoint_url, "profile", "import", uri,
                 "--dataset", "s3", "--platemap", str(platemap), "--compound-col", "compound",
                 "--map", "Metadata_Plate=Image_Metadata_Plate"]) == 0
    wells = _read(s3_lake, "features_well", "s3")
    assert len(wells) == 40 and set(wells["Metadata_Plate"]) == set(source["Metadata_Plate"])
    assert "Metadata_dose" in wells  # detected from the platemap's `dose` column


@pytest.mark.parametrize("args, message", [
    (["--negcon", "Metadata_nope == 'DMSO'"], "--negcon \"Metadata_nope == 'DMSO'\": not a valid pandas query"),
    (["--negcon", "Metadata_pert_iname =="], "not a valid pandas query"),
    (["--negcon", "Metadata_pubchem_cid * 2"], "must select rows"),
    (["--compound-col", "nope"], "--compound-col nope: no such column"),
    (["--map", "Metadata_Plate"], "--map 'Metadata_Plate' must look like KEY=VALUE"),
    (["--compound-col", "Metadata_broad_sample", "--negcon", "Metadata_pert_iname == 'none'"],
     "row 10 (plate BR00117060a10x, well A11) has no compound"),
])
def test_bad_options_are_one_line_errors(local_lake, capsys, args, message):
    code = main(["--lake", local_lake.uri, "profile", "import", str(JUMP_MOA), "--dataset", "x", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_missing_keys_and_unreadable_files(local_lake, tmp_path):
    path = tmp_path / "wells.csv"
    pd.DataFrame({"Metadata_Site": ["X"], "Metadata_Well": ["A01"], "Cells_AreaShape_Area": [1.0]}).to_csv(path)
    with pytest.raises(UserError, match="column Metadata_Plate is missing; map it with --map"):
        import_profiles(local_lake, str(path), "x")
    pd.DataFrame({"Metadata_Plate": ["X"], "Metadata_Well": ["A01"], "Cells_AreaShape_Area": [1.0]}).to_csv(path)
    with pytest.raises(UserError, match="no compound column"):
        import_profiles(local_lake, str(path), "x")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="bad.parquet: cannot read as Parquet"):
        import_profiles(local_lake, str(bad), "x")
    with pytest.raises(UserError, match="nowhere.csv: file not found"):
        import_profiles(local_lake, str(tmp_path / "nowhere.csv"), "x")


def test_import_jump_well_profiles_with_metadata_constants(local_lake):
    """A 2-well JUMP CellProfiler profile (5,790 features) with metadata given as constants."""
    path = shared_path("data", "jump-metadata", "example_well_level_cellprofiler_profile__BR00121431_2wells.csv")
    code = main(["--lake", local_lake.uri, "profile", "import", str(path), "--dataset", "jump-example",
                 "--meta", "Metadata_Source=source_4", "--meta", "Metadata_Batch=2021_06_21_Batch7",
                 "--meta", f"Metadata_JCP2022={DMSO_JCP2022}"])
    assert code == 0
    source = pd.read_csv(path).sort_values("Metadata_Well").reset_index(drop=True)
    wells = _read(local_lake, "features_well", "jump-example")
    feats = feature_columns(wells)
    assert len(feats) > 5000 and "Cells_AreaShape_Area" in feats
    np.testing.assert_allclose(wells[feats].to_numpy(np.float64), source[feats].to_numpy(np.float32), rtol=0,
                               equal_nan=True)
    assert wells["Metadata_SiteCount"].tolist() == source["Metadata_Site_Count"].tolist()
    treatment = _read(local_lake, "features_treatment", "jump-example")
    assert treatment["Metadata_WellCount"].tolist() == [2]
    assert treatment["Metadata_pert_type"].tolist() == ["negcon"]
    np.testing.assert_allclose(treatment[feats].to_numpy()[0], wells[feats].mean().to_numpy(), rtol=1e-5,
                               equal_nan=True)


def test_evaluate_annotations_joined_on_a_compound_key_column(local_lake, tmp_path):
    """`cpldm evaluate --annotations FILE --annotation-key COL`: COL holds the imported compound ids (here names,
    with one row per compound and dose as BBBC021's moa file has)."""
    from cpldm_core.evaluation.config import PRESETS
    from pipelines.evaluate import load_labels

    profiles, platemap, source = _cellprofiler_style(tmp_path)
    import_profiles(local_lake, str(profiles), "cp", options=ImportOptions(
        platemap=str(platemap), compound_col="compound", negcon="Metadata_compound == 'DMSO'"))
    treated = source[source["compound"] != "DMSO"]
    moa_file = tmp_path / "moa.csv"
    pd.DataFrame({"compound": np.repeat(treated["compound"].to_numpy(), 2), "concentration": 1.0,
                  "moa": np.repeat(treated["Metadata_moa"].to_numpy(), 2)}).to_csv(moa_file, index=False)
    cfg = replace(PRESETS["tiny"], annotation_key="compound")
    labels = load_labels(local_lake, cfg, {"compounds"}, str(moa_file)).set_index("Metadata_JCP2022")
    expected = treated.groupby("compound")["Metadata_moa"].first()
    assert labels.loc[expected.index, "Metadata_moa"].tolist() == expected.tolist()
    with pytest.raises(UserError, match="--annotation-key nope: no such column"):
        load_labels(local_lake, replace(cfg, annotation_key="nope"), {"compounds"}, str(moa_file))
