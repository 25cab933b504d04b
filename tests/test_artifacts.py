"""Artifact records (storage_schemas/artifacts.py): round trip through a real lake, named errors for missing,
older, incomplete, mistyped and hand-edited records, and a fingerprint that covers the science fields only
(checked against a sha256 of the JSON computed here by hand)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing

import pytest

from storage_schemas import SchemaError
from storage_schemas import artifacts as art


def _sample(tp, k: int = 0):
    """A value of annotation ``tp`` (``k`` picks another one)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return args[k % len(args)]
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample([a for a in args if a is not type(None)][0], k)
    if origin is tuple:
        return (_sample(args[0], k), _sample(args[0], k + 1))
    if origin is dict:
        return {f"key{k}": _sample(args[1], k)}
    if tp is art.InputRef:
        return art.InputRef(kind="VaeModel", id=f"v{k}", fingerprint=f"{k:064x}")
    return {str: f"s{k}", int: 3 + k, float: 0.25 + k, bool: bool(k % 2), typing.Any: [k, "a"]}[tp]


def example(cls, k: int = 0):
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name], k) for f in dataclasses.fields(cls)})


RECORDS = sorted(art.RECORDS.values(), key=lambda c: c.KIND)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.KIND)
def test_record_round_trips_through_the_lake(cls, local_lake):
    rec = example(cls)
    rel = art.write_record(local_lake, "things/a", rec)
    assert rel == "things/a/_artifact.json"
    back = art.read_record(local_lake, "things/a", cls)
    assert back == rec and type(back) is cls
    assert isinstance(back.inputs["key0"], art.InputRef)
    # the stored fingerprint is the sha256 of the canonical JSON of kind + science fields, recomputed here
    body = json.loads(local_lake.read_bytes(rel))
    skip = {"id", "code_version", "fingerprint", "schema_version", *cls.RESOURCES, *cls.OUTPUTS}
    science = {k: v for k, v in body.items() if k not in skip}
    want = hashlib.sha256(json.dumps(science, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert body["fingerprint"] == want == rec.fingerprint
    assert body["schema_version"] == art.ARTIFACT_SCHEMA_VERSION and body["kind"] == cls.KIND


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.KIND)
def test_fingerprint_ignores_resources_and_outputs_and_follows_every_science_field(cls):
    base = example(cls)
    hints = typing.get_type_hints(cls)
    not_science = set(cls.RESOURCES) | set(cls.OUTPUTS) | {"id", "code_version"}
    assert "resources" in cls.RESOURCES
    for f in dataclasses.fields(cls):
        other = dataclasses.replace(base, **{f.name: _sample(hints[f.name], 1)})
        assert other != base, f.name
        if f.name in not_science:
            assert other.fingerprint == base.fingerprint, f"{f.name} is not science but changed the fingerprint"
        else:
            assert other.fingerprint != base.fingerprint, f"science field {f.name} did not change the fingerprint"
            assert f.name in " ".join(other.changed_fields(base)), f.name
    # an input whose own fingerprint moved (a refitted VAE) changes the artifact's
    moved = dataclasses.replace(base, inputs={"key0": art.InputRef("VaeModel", "v0", "f" * 64)})
    assert moved.fingerprint != base.fingerprint and moved.changed_fields(base) == ["inputs.key0"]


def test_missing_and_older_records_name_the_command_that_makes_them(local_lake):
    with pytest.raises(art.ArtifactMissing, match=r"latents/x/_artifact.json: no LatentCache record.*"
                                                   r"`cpldm ingest --vae-id x --force`") as info:
        art.read_record(local_lake, "latents/x", art.LatentCache, "x")
    assert isinstance(info.value, SchemaError) and "\n" not in str(info.value)   # the CLI prints it as one line
    body = json.loads(art.encode(example(art.VaeModel)))
    local_lake.write_json("vae/v/_artifact.json", {**body, "schema_version": 0})
    with pytest.raises(art.ArtifactOutdated, match=r"schema version 0; this cpldm reads version 1.*"
                                                    r"`cpldm fit-vae --vae-id s0 --force`"):
        art.read_record(local_lake, "vae/v", art.VaeModel)
    local_lake.write_json("vae/v/_artifact.json", body)
    with pytest.raises(art.ArtifactOutdated, match="is a 'VaeModel' record, expected 'ModelCard'"):
        art.read_record(local_lake, "vae/v", art.ModelCard)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.KIND)
def test_incomplete_mistyped_and_edited_records_are_refused_listing_every_problem(cls):
    body = json.loads(art.encode(example(cls)))
    broken = {k: v for k, v in body.items() if k != "config"}
    broken["resources"] = ["not", "an", "object"]
    broken["inputs"] = {"key0": {"kind": "VaeModel", "id": 7}}
    broken["colour"] = "blue"
    with pytest.raises(art.ArtifactInvalid) as info:
        art.decode(cls, json.dumps(broken).encode(), "d/_artifact.json")
    msg = str(info.value)
    for part in ("field 'config' is missing", "field 'resources' has type list, expected an object",
                 "field 'inputs.key0.fingerprint' is missing", "field 'inputs.key0.id' is 7 (int), expected str",
                 f"field 'colour' is not part of a {cls.KIND} record", "d/_artifact.json: "):
        assert part in msg, part
    assert len(info.value.problems) == 5
    # a science field edited by hand: every field still well typed, but the stored fingerprint no longer fits
    science = next(f for f in dataclasses.fields(cls) if f.name == "config")
    edited = {**body, science.name: {"key0": ["tampered"]}}
    with pytest.raises(art.ArtifactInvalid, match="does not match the fields.*the file was edited"):
        art.decode(cls, json.dumps(edited).encode())
    # a resource edited by hand is not science: accepted
    assert art.decode(cls, json.dumps({**body, "resources": {"workers": 64}}).encode()).resources == {"workers": 64}
    with pytest.raises(art.ArtifactInvalid, match="not valid JSON"):
        art.decode(cls, b"{")


def test_a_record_that_could_not_be_read_back_is_not_written(local_lake):
    bad = dataclasses.replace(example(art.LatentCache), crop_size="64", channel_groups=((0, 1, 2), ("x",)))
    with pytest.raises(art.ArtifactInvalid, match=r"channel_groups\[1\]\[0\]' is 'x'.*"
                                                  r"crop_size' is '64' \(str\), expected int"):
        art.write_record(local_lake, "latents/bad", bad)
    assert not local_lake.exists("latents/bad/_artifact.json")
