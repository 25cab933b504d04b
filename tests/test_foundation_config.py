"""Typed config: YAML + overrides, unknown keys and wrong types rejected with the key named."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cpldm_core.configuration import config_to_dict, load_config
from cpldm_core.errors import UserError


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    preset: Literal["tiny", "demo"] = "tiny"
    sizes: tuple[int, ...] = (1, 2)
    optim: Inner = field(default_factory=Inner)
    flag: bool = False


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["optim.steps=7", "sizes=3,4,5", "flag=true", "preset=demo"])
    assert cfg == Outer(name="a", preset="demo", sizes=(3, 4, 5), optim=Inner(lr=0.5, steps=7), flag=True)
    assert load_config(Outer, overrides=config_to_dict(cfg)) == cfg  # JSON round trip


@pytest.mark.parametrize("override, message", [
    (["optim.stepz=3"], "unknown config key\\(s\\) optim.stepz"),
    (["optim.steps=abc"], "'optim.steps': expected an integer"),
    (["preset=huge"], "'preset': 'huge' is not one of"),
    (["flag=maybe"], "'flag': expected true/false"),
    (["nokeyvalue"], "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(Outer, overrides=override)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Outer, bad)


# ---------------------------------------------------------------------------------------------- ranges (issue 22)
from dataclasses import field as _field  # noqa: E402

from cpldm_core.configuration import bounds, check_name  # noqa: E402


@dataclass(frozen=True)
class Ranged:
    rate: float = _field(default=0.5, metadata=bounds(ge=0, le=1))
    lr: float = _field(default=1e-3, metadata=bounds(gt=0))
    count: int = 3                       # no declaration: finite and >= 0
    offset: int = _field(default=-1, metadata=bounds(ge=-1))
    inner: Inner = _field(default_factory=Inner)


@pytest.mark.parametrize("override, message", [
    (["rate=1.5"], "'rate': 1.5 is out of range \\(must be <= 1\\)"),
    (["lr=0"], "'lr': 0.0 is out of range \\(must be > 0\\)"),
    (["lr=nan"], "'lr': nan is not a finite number"),
    (["lr=.inf"], "'lr': inf is not a finite number"),
    (["count=-3"], "'count': -3 is out of range \\(must be >= 0\\)"),
    (["offset=-2"], "'offset': -2 is out of range"),
    (["inner.lr=-1"], "'inner.lr': -1.0 is out of range"),
])
def test_ranges_are_checked_and_name_the_key(override, message):
    assert load_config(Ranged) == Ranged()
    assert load_config(Ranged, overrides=["offset=-1", "rate=1", "count=0"]).offset == -1
    with pytest.raises(UserError, match=message):
        load_config(Ranged, overrides=override)


def _stage_configs():
    from cpldm_core.design import GenerateConfig
    from cpldm_core.diffusion import TrainConfig
    from cpldm_core.features.config import ProfileConfig
    from cpldm_core.images import IngestConfig
    return {"ingest": IngestConfig, "train": TrainConfig, "generate": GenerateConfig, "profile": ProfileConfig}


@pytest.mark.parametrize("stage, override, key", [
    ("ingest", "stats_sites=-3", "stats_sites"), ("ingest", "crop_size=-64", "crop_size"),
    ("ingest", "crop_size=0", "crop_size"), ("ingest", "read_concurrency=0", "read_concurrency"),
    ("ingest", "vae_id=../../x", "vae_id"),
    ("train", "lr=-1", "lr"), ("train", "lr=nan", "lr"), ("train", "cond_dropout=5", "cond_dropout"),
    ("train", "warmup_steps=-10", "warmup_steps"),
    ("generate", "guidance_scale=nan", "guidance_scale"), ("generate", "gpus_per_actor=-1", "gpus_per_actor"),
    ("generate", "run=../../x", "run"), ("profile", "workers=0", "workers"),
    ("profile", "segmentation.smoothing_sigma_frac=-1", "segmentation.smoothing_sigma_frac"),
    ("profile", "dataset=a/b", "dataset"),
])
def test_stage_configs_refuse_nonsense(stage, override, key):
    """Issue 22 #9 and #8: every numeric field has a range; every value of the issue is refused naming its key."""
    cls = _stage_configs()[stage]
    load_config(cls)  # the defaults pass
    with pytest.raises(UserError, match=key.replace(".", "\\.")):
        load_config(cls, overrides=[override])


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "", "x y", "run\n2", "a..b"])
def test_names_that_leave_or_hide_in_the_lake_are_refused(name):
    with pytest.raises(UserError, match="names may hold only"):
        check_name(name, "--run")


def test_good_names_pass():
    for name in ("scm-N10", "fitted.small_1", "real", "sdxl-vae"):
        assert check_name(name) == name


@pytest.mark.parametrize("argv", [
    ["generate", "--run", "../../x"], ["ingest", "--vae-id", "../../x"], ["train", "--run", "../x"],
    ["profile", "--dataset", "../x"], ["evaluate", "--run", "a/b"], ["fit-vae", "--vae-id", ".."],
])
def test_cli_name_options_refuse_paths(tmp_path, capsys, argv):
    from pipelines.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--lake", str(tmp_path / "lake"), *argv])
    assert exit_.value.code == 2
    assert "names may hold only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "lake").exists()


@pytest.mark.parametrize("argv, key", [
    (["ingest", "--set", "crop_size=-64"], "crop_size"),
    (["ingest", "--set", "read_concurrency=0"], "read_concurrency"),
    (["ingest", "--set", "stats_sites=-3"], "stats_sites"),
    (["generate", "--set", "guidance_scale=nan"], "guidance_scale"),
    (["generate", "--gpus-per-actor", "-1"], "gpus_per_actor"),
    (["generate", "--run", "x", "--set", "run=../y"], "run"),
])
def test_cli_config_range_errors_are_one_line(tmp_path, capsys, argv, key):
    from pipelines.cli import main
    assert main(["--lake", str(tmp_path / "lake"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err
