"""Typed, versioned records of the lake's artifacts: what made each one, read and written in one place.

Every artifact directory (``vae/<id>/``, ``latents/<id>/``, ``models/<run>/``, ...) holds one record,
``<dir>/_artifact.json``: a flat JSON object with

- ``kind`` and ``schema_version`` (a record of an older version is refused, naming the command that remakes it);
- ``id`` (the artifact's name) and ``inputs``: ``{role: {"kind", "id", "fingerprint"}}`` of the artifacts it was
  made from;
- the kind's typed fields (below), among them ``config`` (the stage's science settings as recorded) and
  ``resources`` (workers, concurrency, batch sizes: how it was computed, not what);
- ``fingerprint``: sha256 of the canonical JSON (sorted keys, no whitespace) of the kind, the inputs and the
  *science* fields. Excluded: ``id``, ``code_version``, the fields a kind declares in ``RESOURCES`` (changing
  them never recomputes) and in ``OUTPUTS`` (values measured while making the artifact, e.g. normalisation
  statistics: they follow from the science fields, so the fingerprint can be computed before the work is done).

One rule for every stage: the fingerprint of what is asked for differs from the stored one -> recompute (or
refuse to resume, naming the fields that changed); only resources differ -> reuse.

Reading validates like a table (:mod:`storage_schemas.spec`): every missing, extra or mistyped field is listed
in one :class:`ArtifactInvalid`, and a stored fingerprint that does not match the fields (a hand-edited file)
is refused. Imports the standard library only; I/O goes through any object with ``read_bytes(rel)``,
``write_bytes(rel, data)`` (atomic, as ``pipelines.storage.Lake`` does) and ``exists(rel)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from storage_schemas.spec import SchemaError

#: Name of the record file inside an artifact directory.
ARTIFACT_FILE = "_artifact.json"
#: Version of the record layout; bumped when a kind's fields change (older records are then refused).
ARTIFACT_SCHEMA_VERSION = 1
#: Fields every record has besides its kind's own (``fingerprint`` is stored, never a dataclass field).
HEADER_FIELDS = ("kind", "schema_version", "fingerprint")
#: Fields never part of the fingerprint: names and provenance, not science.
NOT_SCIENCE = ("id", "code_version")


class Store(Protocol):
    """What the records need from a lake (``pipelines.storage.Lake`` has all three)."""

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...

    def exists(self, rel: str) -> bool: ...


# ---------------------------------------------------------------------------------------------- errors
class ArtifactError(SchemaError):
    """An artifact's record is missing, older than this code or invalid; one line, naming the remaking command.

    A :class:`SchemaError`, so the CLI prints it as one line like the table errors.
    """

    def __init__(self, where: str, kind: str, problems: list[str], made_by: str = ""):
        self.table, self.where, self.kind, self.problems, self.made_by = kind, where, kind, problems, made_by
        hint = f"; (re)make it with `{made_by}`" if made_by else ""
        ValueError.__init__(self, f"{where}: {'; '.join(problems)}{hint}")


class ArtifactMissing(ArtifactError):
    """No record where one is needed (the artifact was never made, or made by a cpldm without records)."""


class ArtifactOutdated(ArtifactError):
    """A record of an older ``schema_version`` (or another kind) than the reader expects."""


class ArtifactInvalid(ArtifactError):
    """Missing, extra or mistyped fields, or a fingerprint that does not match the fields."""


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class InputRef:
    """An input of an artifact: its kind, id and the fingerprint it had when it was used."""

    kind: str
    id: str
    fingerprint: str


@dataclass(frozen=True)
class Record:
    """Base of the records. Subclasses set the class variables and add typed fields.

    Class variables:
        KIND: the ``kind`` written in the file.
        RESOURCES: fields holding resources (excluded from the fingerprint).
        OUTPUTS: fields measured while making the artifact (excluded from the fingerprint; they have defaults
            so that the record of what is *asked for* can be built, fingerprinted and compared first).
        MADE_BY: the command that (re)makes the artifact, ``{id}`` replaced by the record's id.
    """

    KIND: ClassVar[str] = ""
    RESOURCES: ClassVar[tuple[str, ...]] = ("resources",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    MADE_BY: ClassVar[str] = ""

    id: str
    inputs: dict[str, InputRef]
    #: the stage's science settings as recorded (resources removed)
    config: dict[str, Any] = field(default_factory=dict)
    #: how it was computed (workers, concurrency, CPUs/GPUs, inference batch sizes); never in the fingerprint
    resources: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""

    # -- science identity
    def science(self) -> dict:
        """The fields the fingerprint covers, as canonical JSON values (inputs included)."""
        skip = set(NOT_SCIENCE) | set(self.RESOURCES) | set(self.OUTPUTS)
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of ``{"kind", **science()}``."""
        return hashlib.sha256(canonical_json({"kind": self.KIND, **self.science()})).hexdigest()

    def ref(self) -> InputRef:
        """This artifact as an input of another."""
        return InputRef(kind=self.KIND, id=self.id, fingerprint=self.fingerprint)

    def changed_fields(self, other: "Record") -> list[str]:
        """Names of the science fields (``config.<key>``, ``inputs.<role>`` for nested ones) that differ."""
        a, b = self.science(), other.science()
        out = []
        for name in sorted(set(a) | set(b)):
            va, vb = a.get(name), b.get(name)
            if isinstance(va, dict) and isinstance(vb, dict):
                out += [f"{name}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
            elif va != vb:
                out.append(name)
        return out

    def made_by(self) -> str:
        return made_by(type(self), self.id)


@dataclass(frozen=True)
class VaeModel(Record):
    """A VAE in the lake (``vae/<id>/``, diffusers ``AutoencoderKL`` files next to the record).

    ``origin``: ``fit-vae`` (fitted on the lake's training crops; ``config`` is its FitVaeConfig without
    resources) or ``external`` (weights copied in; ``config`` says where from). ``latent_channels`` per
    3-channel group and ``downsample`` (px per latent px) are what ingest needs to lay out the cache.
    """

    KIND: ClassVar[str] = "VaeModel"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("scaling_factor", "eval_mse_per_channel")
    MADE_BY: ClassVar[str] = "cpldm fit-vae --vae-id {id} --force"

    origin: Literal["fit-vae", "external"] = "fit-vae"
    architecture: str = ""
    latent_channels: int = 4
    downsample: int = 8
    scaling_factor: float = 1.0
    eval_mse_per_channel: tuple[float, ...] = ()


@dataclass(frozen=True)
class LatentCache(Record):
    """A latent cache (``latents/<id>/latents.zarr`` + ``latent_index`` partition ``vae=<id>``).

    Inputs: ``vae`` (a VaeModel, or for a directory/hub VAE a ref whose fingerprint hashes its location) and
    ``catalog`` (fingerprint of the planned sites and their row blocks). ``latent_shape`` is one row
    ``(8, crop/8, crop/8)``; ``normalisation_low/high`` map grey levels to [-1, 1] per channel (CHANNELS order);
    ``scaling_factor`` is the VAE's (latents are stored multiplied by it).
    """

    KIND: ClassVar[str] = "LatentCache"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("normalisation_low", "normalisation_high", "normalisation_sites",
                                          "scaling_factor")
    MADE_BY: ClassVar[str] = "cpldm ingest --vae-id {id} --force"

    vae_id: str = ""
    vae_location: str = ""
    vae_subfolder: str | None = None
    channels: tuple[str, ...] = ()
    channel_groups: tuple[tuple[int, ...], ...] = ()
    illumination: str = "auto"
    normalisation_method: str = ""
    low_percentile: float = 0.0
    high_percentile: float = 100.0
    crop_mode: str = "centre"
    crop_size: int = 0
    tile_grid: int = 1
    crops_per_site: int = 1
    latent_shape: tuple[int, ...] = ()
    normalisation_low: tuple[float, ...] = ()
    normalisation_high: tuple[float, ...] = ()
    normalisation_sites: int = 0
    scaling_factor: float = 1.0


@dataclass(frozen=True)
class ModelCard(Record):
    """A trained denoiser (``models/<run>/``). Inputs: ``latents`` (LatentCache), ``embeddings`` (encoder).

    ``confounders``: the confounder columns the model conditions on (empty for scm-free) and ``vocabulary``
    their known values (``{column: [values]}``); ``schedule``: the noise schedule config every sampler uses;
    ``training_data_fingerprint``: hash of the training rows (latent rows x labels) it saw.
    """

    KIND: ClassVar[str] = "ModelCard"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("steps_done",)
    MADE_BY: ClassVar[str] = "cpldm train --run {id}"

    model_kind: Literal["scm", "scm-free"] = "scm"
    confounders: tuple[str, ...] = ()
    vocabulary: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compound_input: str = ""
    latent_shape: tuple[int, ...] = ()
    schedule: dict[str, Any] = field(default_factory=dict)
    vae_id: str = ""
    encoder_id: str = ""
    training_data_fingerprint: str = ""
    steps_done: int = 0


@dataclass(frozen=True)
class GenerationRun(Record):
    """Generated latents/images (``synthetic/<run>/``). Input: ``model`` (ModelCard) and, when a simulator
    oracle supplied the images instead of a model, ``oracle`` names its kind."""

    KIND: ClassVar[str] = "GenerationRun"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("rows",)
    MADE_BY: ClassVar[str] = "cpldm generate --run {id}"

    model_run: str = ""
    design: str = "uniform"
    draws: int = 0
    compounds: str = "all"
    guidance_scale: float = 1.0
    sampler: str = ""
    sampler_steps: int = 0
    seed_namespace: str = ""
    oracle: str | None = None
    rows: int = 0


@dataclass(frozen=True)
class ProfileSet(Record):
    """Profiles of one dataset (``features/.../dataset=<id>``): ``real`` (input ``catalog``) or a generation
    run (input ``images``: GenerationRun); ``levels`` written (``cell``, ``well``)."""

    KIND: ClassVar[str] = "ProfileSet"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("n_features", "n_wells")
    MADE_BY: ClassVar[str] = "cpldm profile --dataset {id}"

    dataset_kind: Literal["real", "generated", "imported"] = "real"
    feature_set: str = "default"
    levels: tuple[str, ...] = ("well",)
    illumination: str = "auto"
    n_features: int = 0
    n_wells: int = 0


@dataclass(frozen=True)
class EvalRun(Record):
    """An evaluation (``eval/<id>/``). Inputs: one ProfileSet per data type (role = data type), and ``truth``
    (the interventional truth's ProfileSet) when it was the yardstick; ``metrics``: those in ``eval_results``."""

    KIND: ClassVar[str] = "EvalRun"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("metrics",)
    MADE_BY: ClassVar[str] = "cpldm evaluate --run {id}"

    data_types: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


#: Every record kind by its ``kind`` string.
RECORDS: dict[str, type[Record]] = {cls.KIND: cls for cls in
                                    (VaeModel, LatentCache, ModelCard, GenerationRun, ProfileSet, EvalRun)}

#: Lake directory of each kind's artifact (``{id}`` = the record's id): where its ``_artifact.json`` lives, so an
#: input named by kind and id is found in one read. Profile sets (made by ``cpldm profile`` or imported) keep
#: theirs beside the profile config, the feature tables themselves being partitions of shared tables.
ARTIFACT_DIRS: dict[str, str] = {"VaeModel": "vae/{id}", "LatentCache": "latents/{id}", "ModelCard": "models/{id}",
                                 "GenerationRun": "synthetic/{id}", "ProfileSet": "features/_config/{id}",
                                 "EvalRun": "eval/{id}"}


def made_by(cls: type[Record], artifact_id: str) -> str:
    return cls.MADE_BY.format(id=artifact_id or "<id>")


# ---------------------------------------------------------------------------------------------- JSON
def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, no NaN: the bytes the fingerprints hash."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def fingerprint_of(obj: Any) -> str:
    """sha256 hex of :func:`canonical_json` (for inputs that are not records, e.g. a catalog plan)."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy scalars from a stage's computations
        return value.item()
    return value


def encode(record: Record) -> bytes:
    """The record file's bytes (readable JSON; the fingerprint is stored for tamper checks and quick joins)."""
    fields = {f.name: _jsonable(getattr(record, f.name)) for f in dataclasses.fields(record)}
    hints, problems = typing.get_type_hints(type(record)), []
    for name, value in fields.items():   # validated on write too: a stage cannot store a record it could not read
        _convert(value, hints[name], name, problems)
    if problems:
        raise ArtifactInvalid(f"{record.KIND} '{record.id}'", record.KIND, problems)
    body = {"kind": record.KIND, "schema_version": ARTIFACT_SCHEMA_VERSION, "fingerprint": record.fingerprint,
            **fields}
    return json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode()


def decode(cls: type[Record], data: bytes, where: str = ARTIFACT_FILE) -> Record:
    """Parse and validate record bytes as ``cls``; raises an :class:`ArtifactError` naming every problem."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactInvalid(where, cls.KIND, [f"not valid JSON ({exc})"], made_by(cls, "")) from None
    if not isinstance(body, dict):
        raise ArtifactInvalid(where, cls.KIND, ["not a JSON object"], made_by(cls, ""))
    rid = body.get("id") if isinstance(body.get("id"), str) else ""
    if body.get("kind") != cls.KIND:
        raise ArtifactOutdated(where, cls.KIND, [f"is a {body.get('kind')!r} record, expected {cls.KIND!r}"],
                               made_by(cls, rid))
    version = body.get("schema_version")
    if version != ARTIFACT_SCHEMA_VERSION:
        raise ArtifactOutdated(where, cls.KIND, [f"{cls.KIND} record of schema version {version!r}; this cpldm "
                                                 f"reads version {ARTIFACT_SCHEMA_VERSION}"], made_by(cls, rid))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems: list[str] = []
    values = {}
    for name in names:
        if name not in body:
            problems.append(f"field '{name}' is missing (expected {_type_name(hints[name])})")
            continue
        values[name] = _convert(body[name], hints[name], name, problems)
    for name in body:
        if name not in names and name not in HEADER_FIELDS:
            problems.append(f"field '{name}' is not part of a {cls.KIND} record")
    if not isinstance(body.get("fingerprint"), str):
        problems.append("field 'fingerprint' is missing or not a string")
    if problems:
        raise ArtifactInvalid(where, cls.KIND, problems, made_by(cls, rid))
    record = cls(**values)
    if record.fingerprint != body["fingerprint"]:
        raise ArtifactInvalid(where, cls.KIND, [f"stored fingerprint {body['fingerprint'][:12]} does not match the "
                                                f"fields ({record.fingerprint[:12]}): the file was edited"],
                              made_by(cls, rid))
    return record


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """``value`` (from JSON) as type ``tp`` (lists -> tuples, dicts -> InputRef); appends problems, never raises."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, problems) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            problems.append(f"field '{path}' is {value!r}, expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"field '{path}' has type {type(value).__name__}, expected an object {tp.__name__}")
            return value
        sub = typing.get_type_hints(tp)
        before = len(problems)
        for name in sub:
            if name not in value:
                problems.append(f"field '{path}.{name}' is missing (expected {_type_name(sub[name])})")
        for name in value:
            if name not in sub:
                problems.append(f"field '{path}.{name}' is not part of {tp.__name__}")
        out = {n: _convert(value[n], sub[n], f"{path}.{n}", problems) for n in sub if n in value}
        return tp(**out) if len(problems) == before else value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"field '{path}' has type {type(value).__name__}, expected an object")
            return value
        return {k: _convert(v, args[1], f"{path}.{k}", problems) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"field '{path}' has type {type(value).__name__}, expected a list")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value))
        if len(value) != len(args):
            problems.append(f"field '{path}' has {len(value)} items, expected {len(args)}")
            return value
        return tuple(_convert(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    ok = {str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}.get(tp)
    if ok is None:
        return value
    if not ok(value):
        problems.append(f"field '{path}' is {value!r} ({type(value).__name__}), expected {tp.__name__}")
        return value
    return float(value) if tp is float else value


# ---------------------------------------------------------------------------------------------- one write, one read
def write_record(store: Store, directory: str, record: Record) -> str:
    """Write ``<directory>/_artifact.json`` (atomically, through ``store.write_bytes``); returns its path."""
    rel = f"{directory.rstrip('/')}/{ARTIFACT_FILE}"
    store.write_bytes(rel, encode(record))
    return rel


def read_record(store: Store, directory: str, cls: type[Record], artifact_id: str = "") -> Record:
    """Read and validate ``<directory>/_artifact.json`` as ``cls``.

    Raises:
        ArtifactMissing: no record (one line naming the file and the command that makes it).
        ArtifactOutdated / ArtifactInvalid: see :func:`decode`.
    """
    rel = f"{directory.rstrip('/')}/{ARTIFACT_FILE}"
    if not store.exists(rel):
        raise ArtifactMissing(rel, cls.KIND, [f"no {cls.KIND} record (the artifact was not made, or made by a "
                                              f"cpldm without records)"], made_by(cls, artifact_id))
    return decode(cls, store.read_bytes(rel), where=rel)


def artifact_dir(kind: str, artifact_id: str) -> str:
    """Lake directory of the artifact ``kind``/``artifact_id`` (:data:`ARTIFACT_DIRS`)."""
    if kind not in ARTIFACT_DIRS:
        raise ValueError(f"{kind!r} is not an artifact kind with a record ({', '.join(ARTIFACT_DIRS)})")
    return ARTIFACT_DIRS[kind].format(id=artifact_id)


def read_artifact(store: Store, cls: type[Record], artifact_id: str) -> Record:
    """The record of artifact ``artifact_id`` of kind ``cls``, read from its directory (:func:`read_record`)."""
    return read_record(store, artifact_dir(cls.KIND, artifact_id), cls, artifact_id)


# ---------------------------------------------------------------------------------------------- lineage
@dataclass(frozen=True)
class LineageNode:
    """One artifact on the way back from an artifact to its sources.

    ``depth`` 0 is the artifact asked about; ``role`` the input role it plays for its child ("" at depth 0);
    ``record`` is ``None`` for inputs that are not artifacts with records (``Catalog``, ``Embeddings``, an
    oracle, an imported file): the sources of the graph. ``repeated``: already listed higher up (a shared input).
    """

    depth: int
    role: str
    kind: str
    id: str
    fingerprint: str
    record: Record | None = None
    repeated: bool = False


def lineage(store: Store, kind: str, artifact_id: str) -> list[LineageNode]:
    """Every artifact that went into ``kind``/``artifact_id``, depth first (inputs in role order).

    Each input that is an artifact kind is read from its directory and must be the artifact the child was made
    from: its id and its fingerprint equal the child's :class:`InputRef`. A parent that is missing, invalid or
    remade since (another fingerprint) raises one :class:`ArtifactError` line naming the child, the role, the
    parent and the command that remakes the child.
    """
    if kind not in RECORDS:
        raise ValueError(f"{kind!r} is not an artifact kind ({', '.join(RECORDS)})")
    root = read_artifact(store, RECORDS[kind], artifact_id)
    nodes = [LineageNode(0, "", kind, artifact_id, root.fingerprint, root)]
    seen = {(kind, artifact_id)}

    def walk(child: Record, depth: int) -> None:
        for role in sorted(child.inputs):
            ref = child.inputs[role]
            if ref.kind not in RECORDS:
                nodes.append(LineageNode(depth, role, ref.kind, ref.id, ref.fingerprint))
                continue
            if (ref.kind, ref.id) in seen:
                nodes.append(LineageNode(depth, role, ref.kind, ref.id, ref.fingerprint, repeated=True))
                continue
            where = f"{child.KIND} '{child.id}' input '{role}' ({ref.kind} '{ref.id}')"
            try:
                parent = read_artifact(store, RECORDS[ref.kind], ref.id)
            except ArtifactError as exc:
                # the parent is what is missing or broken: its own command remakes it
                raise type(exc)(where, child.KIND, [str(exc).split("; (re)make it with")[0]],
                                exc.made_by) from None
            if parent.id != ref.id or parent.fingerprint != ref.fingerprint:
                raise ArtifactInvalid(where, child.KIND, [
                    f"made from fingerprint {ref.fingerprint[:12]}, but {artifact_dir(ref.kind, ref.id)} holds "
                    f"'{parent.id}' with fingerprint {parent.fingerprint[:12]} (remade since)"], child.made_by())
            seen.add((ref.kind, ref.id))
            nodes.append(LineageNode(depth, role, ref.kind, ref.id, ref.fingerprint, parent))
            walk(parent, depth + 1)

    walk(root, 1)
    return nodes


__all__ = ["ARTIFACT_DIRS", "ARTIFACT_FILE", "ARTIFACT_SCHEMA_VERSION", "ArtifactError", "ArtifactInvalid",
           "ArtifactMissing", "ArtifactOutdated", "EvalRun", "GenerationRun", "InputRef", "LatentCache",
           "LineageNode", "ModelCard", "ProfileSet", "RECORDS", "Record", "Store", "VaeModel", "artifact_dir",
           "canonical_json", "decode", "encode", "fingerprint_of", "lineage", "read_artifact", "read_record",
           "write_record"]
