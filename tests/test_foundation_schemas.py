"""Schemas: validation names the column; conform casts; the registry is consistent."""
import pyarrow as pa
import pytest

import storage_schemas
from storage_schemas import SchemaError, validate
from storage_schemas.spec import conform


def _compounds(**overrides):
    data = {"Metadata_JCP2022": ["JCP2022_000001", "JCP2022_033924"], "Metadata_InChIKey": ["A", None],
            "Metadata_SMILES": ["CCO", "CS(C)=O"], "Metadata_pert_type": ["trt", "negcon"]}
    data.update(overrides)
    return pa.table(data)


def test_valid_table_passes_and_problems_name_columns():
    validate(_compounds(), "compounds")
    bad = _compounds(Metadata_SMILES=[1, 2]).drop_columns(["Metadata_pert_type"]).append_column(
        "Unexpected", pa.array([1.0, 2.0]))
    with pytest.raises(SchemaError) as info:
        validate(bad, "compounds")
    text = str(info.value)
    assert "'Metadata_SMILES' has type int64" in text
    assert "'Metadata_pert_type' is missing" in text
    assert "'Unexpected' is not part of table 'compounds'" in text
    assert len(info.value.problems) == 3


def test_non_nullable_column_with_nulls_is_reported():
    with pytest.raises(SchemaError, match="'Metadata_JCP2022' has 1 null"):
        validate(_compounds(Metadata_JCP2022=["JCP2022_000001", None]), "compounds")


def test_feature_tables_accept_feature_columns_only():
    base = {"Metadata_JCP2022": ["x"], "Metadata_pert_type": ["trt"], "Metadata_WellCount": [2]}
    ok = pa.table({**base, "Cells_AreaShape_Area": [1.0], "Nuclei_Intensity_MeanIntensity_DNA": [0.5]})
    validate(ok, "features_treatment")
    with pytest.raises(SchemaError, match="'Cells_AreaShape_Area' has type string"):
        validate(pa.table({**base, "Cells_AreaShape_Area": ["big"]}), "features_treatment")
    with pytest.raises(SchemaError, match="'Foo_Bar' is not part"):
        validate(pa.table({**base, "Foo_Bar": [1.0]}), "features_treatment")


def test_conform_casts_to_schema_types_and_orders_columns():
    t = pa.table({"Cells_A": pa.array([1.0], pa.float64()), "Metadata_pert_type": ["trt"],
                  "Metadata_WellCount": pa.array([3], pa.int64()), "Metadata_JCP2022": pa.array(["x"], pa.large_string())})
    out = conform(t, "features_treatment")
    assert out.column_names == ["Metadata_JCP2022", "Metadata_pert_type", "Metadata_WellCount", "Cells_A"]
    assert out.schema.field("Metadata_WellCount").type == pa.int32()
    assert out.schema.field("Cells_A").type == pa.float32()
    assert out.schema.field("Metadata_JCP2022").type == pa.string()


def test_registry_paths_are_unique_and_partitions_are_schema_columns():
    paths = [s.path for s in storage_schemas.TABLES.values()]
    assert len(paths) == len(set(paths))
    for spec in storage_schemas.TABLES.values():
        for col in spec.partitioning:
            assert col in spec.schema.names, (spec.name, col)
        assert spec.is_directory == bool(spec.partitioning) or not spec.is_directory


def test_unknown_table_lists_known_ones():
    with pytest.raises(SchemaError, match="unknown table 'nope'.*sites"):
        validate(pa.table({"a": [1]}), "nope")
