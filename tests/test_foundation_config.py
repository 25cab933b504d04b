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
