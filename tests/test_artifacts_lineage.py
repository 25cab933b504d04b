"""Lineage through the artifact records: a tiny lake made by the stages' own record code (toy VAE, latent cache
and model from tests/_fixtures.py, a real ``cpldm generate`` run, the ProfileSet ``cpldm profile`` writes and the
EvalRun ``cpldm evaluate`` writes) walks back from the evaluation to the VAE; a parent that is missing or was
remade since is one named error line; ``generate`` finds its VAE through the records and never turns a lake name
into a hub request."""
from __future__ import annotations

import dataclasses

import pytest

from cpldm_core.design import GenerateConfig
from cpldm_core.errors import UserError
from cpldm_core.evaluation.config import preset
from cpldm_core.features.config import PRESETS as PROFILE_PRESETS
from pipelines import evaluate, generate, profile
from pipelines.cli import main
from storage_schemas import artifacts as art
from tests._fixtures import TOY_ENCODER, TOY_VAE, build_toy_lake

RUN = "scm-N1"


@pytest.fixture(scope="module")
def lineage_lake(tmp_path_factory):
    from pipelines.storage import Lake

    lake = Lake(str(tmp_path_factory.mktemp("lineage") / "lake"))
    lake.init()
    build_toy_lake(lake, kinds=("scm",), n_compounds=3)
    generate.run(lake, GenerateConfig(model_run="scm", run=RUN, draws=1, compounds="all", sampler="ddim", steps=1,
                                      block_size=8, batch_size=8, design_part_rows=8, dmso_per_draw=1),
                 use_ray=False)
    items = profile.synthetic_items(lake, RUN)
    pset = profile.profile_set_record(lake, PROFILE_PRESETS["demo"], RUN, items)
    art.write_record(lake, art.artifact_dir("ProfileSet", RUN), pset)
    cfg = dataclasses.replace(preset("tiny", concurrency=0), run="e")
    art.write_record(lake, art.artifact_dir("EvalRun", "e"), evaluate.eval_record(lake, cfg, {"c-aware-N1": RUN},
                                                                                  truth=False))
    return lake


def test_eval_lineage_reaches_the_vae_and_the_latent_cache(lineage_lake):
    nodes = art.lineage(lineage_lake, "EvalRun", "e")
    path = [(n.depth, n.role, n.kind, n.id) for n in nodes]
    assert path == [
        (0, "", "EvalRun", "e"),
        (1, "c-aware-N1", "ProfileSet", RUN),
        (2, "images", "GenerationRun", RUN),
        (3, "latents", "LatentCache", TOY_VAE),
        (4, "vae", "VaeModel", TOY_VAE),
        (3, "model", "ModelCard", "scm"),
        (4, "embeddings", "Embeddings", TOY_ENCODER),
        (4, "latents", "LatentCache", TOY_VAE),          # shared input: listed once, then referred to
    ]
    assert nodes[-1].repeated and nodes[-2].record is None          # Embeddings: a source without a record
    # each link is the parent's own fingerprint, recomputed from its fields on read
    gen = art.read_artifact(lineage_lake, art.GenerationRun, RUN)
    card = art.read_artifact(lineage_lake, art.ModelCard, "scm")
    assert gen.inputs["model"] == card.ref() and gen.model_run == "scm"
    assert gen.rows == len(generate.read_manifest(lineage_lake, RUN)) == 3   # DMSO + 2 compounds, 1 draw
    assert nodes[1].record.inputs["images"] == gen.ref()


def test_lineage_cli_prints_the_tree(lineage_lake, capsys):
    assert main(["--lake", lineage_lake.uri, "lake", "lineage", "eval/e"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("EvalRun 'e' ") and len(out) == 8
    assert out[4].strip().startswith("vae: VaeModel 'toy-vae'") and out[4].startswith("        ")
    assert out[-1].endswith("(listed above)") and out[-2].endswith("(source)")


def _copy_lake(lake, tmp_path):
    import shutil

    from pipelines.storage import Lake

    shutil.copytree(lake.fs_path(""), tmp_path / "lake")
    return Lake(str(tmp_path / "lake"))


def test_a_parent_remade_since_is_one_named_error(lineage_lake, tmp_path, capsys):
    lake = _copy_lake(lineage_lake, tmp_path)
    cache = art.read_artifact(lake, art.LatentCache, TOY_VAE)
    art.write_record(lake, f"latents/{TOY_VAE}", dataclasses.replace(cache, crop_size=64))   # re-ingested
    with pytest.raises(art.ArtifactInvalid) as err:
        art.lineage(lake, "EvalRun", "e")
    msg = str(err.value)
    assert msg.startswith(f"GenerationRun '{RUN}' input 'latents' (LatentCache '{TOY_VAE}')") and "remade since" in msg
    assert msg.endswith(f"`cpldm generate --run {RUN}`") and "\n" not in msg
    assert main(["--lake", lake.uri, "lake", "lineage", "EvalRun:e"]) != 0
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "remade since" in err_lines[0]


def test_a_missing_parent_names_the_command_that_makes_it(lineage_lake, tmp_path):
    lake = _copy_lake(lineage_lake, tmp_path)
    lake.delete("models/scm/_artifact.json")
    with pytest.raises(art.ArtifactMissing, match=r"^GenerationRun 'scm-N1' input 'model' \(ModelCard 'scm'\): "
                                                 r"models/scm/_artifact.json: no ModelCard record.*"
                                                 r"`cpldm train --run scm`$"):
        art.lineage(lake, "EvalRun", "e")
    # and generate, which reads the model through its card, says the same in one line
    with pytest.raises(UserError, match="no trained model 'scm'.*cpldm train --run scm"):
        generate.resolve_model(lake, "scm")


def test_generate_resumes_only_the_same_science(lineage_lake, tmp_path):
    lake = _copy_lake(lineage_lake, tmp_path)
    base = dict(model_run="scm", run=RUN, draws=1, compounds="all", sampler="ddim", steps=1, block_size=8,
                batch_size=8, design_part_rows=8, dmso_per_draw=1)
    # resources only (batch size, actors): nothing is recomputed
    again = generate.run(lake, GenerateConfig(**{**base, "batch_size": 2, "actors": 3}), use_ray=False)
    assert again["blocks_done_now"] == 0 and again["blocks_skipped"] == 1
    with pytest.raises(UserError, match=r"with different .*config\.steps.*sampler_steps"):
        generate.run(lake, GenerateConfig(**{**base, "steps": 2}), use_ray=False)


def test_vae_comes_from_the_records_and_a_lake_name_never_reaches_the_hub(lineage_lake):
    model = generate.resolve_model(lineage_lake, "scm")
    source = generate.vae_source(lineage_lake, model, None)
    assert source["location"] == f"lake:vae/{TOY_VAE}" and source["channel_groups"] == [[0, 1, 2], [2, 3, 4]]
    with pytest.raises(UserError, match=f"no VAE 'fitted-small' in .* holds {TOY_VAE}") as err:
        generate.vae_source(lineage_lake, model, "fitted-small")
    assert "\n" not in str(err.value)
    assert generate.vae_source(lineage_lake, model, TOY_VAE)["location"] == f"lake:vae/{TOY_VAE}"
