"""The config schema: defaults, one-line errors naming the key, per-movie overrides."""

from __future__ import annotations

import json

import pytest
import yaml

from rvae_tools.cli import main
from rvae_tools.config import load_config, stage_settings, validate_config, validate_section
from rvae_tools.errors import InputError


def test_repository_config_is_valid(repo):
    config = load_config(repo / "config" / "config.yaml")
    assert "demo" in config["movies"]
    assert config["seed"] == 0


def test_empty_config_gets_the_demo_and_defaults():
    config = validate_config({})
    assert list(config["movies"]) == ["demo"]
    assert config["figures"]["formats"] == ["png", "svg"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"sed": 1}, "unknown key 'sed'"),
        ({"seed": -1}, "seed: -1 is out of range"),
        ({"seed": "one"}, "seed: 'one' is not of type integer"),
        ({"figures": {"dpi": 10}}, "figures.dpi"),
        ({"figures": {"formats": ["gif"]}}, "figures.formats.0"),
        ({"movies": {"m": {"path": 3}}}, "movies.m.path"),
        ({"movies": {"m": {}}}, "movies.m: give exactly one of 'path'"),
        ({"movies": {"m": {"path": "a.tif", "simulate": {}}}}, "movies.m: give exactly one of 'path'"),
        ({"movies": {"m": {"path": "a.tif", "crop": [0, 1]}}}, "movies.m.crop"),
        ({"movies": {"m": {"path": "a.tif", "frames": {"step": 0}}}}, "movies.m.frames.step"),
        ({"movies": {"m": {"path": "a.tif", "colour": 1}}}, "unknown key 'colour'"),
        ({"movies": {"bad name": {"path": "a.tif"}}}, "movies"),
        ({"movies": {}}, "movies"),
    ],
)
def test_bad_config_names_the_key(config, expected):
    with pytest.raises(InputError) as info:
        validate_config(config, source="my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_per_movie_overrides_are_merged_and_validated():
    config = validate_config({"seed": 7, "movies": {"a": {"path": "a.tif", "figures": {"dpi": 300}}}})
    assert stage_settings(config, "figures", "a")["dpi"] == 300
    assert stage_settings(config, "figures")["dpi"] == 150
    assert stage_settings(config, "figures", "a")["seed"] == 7
    with pytest.raises(InputError, match="movies.b.*figures.dpi"):
        validate_config({"movies": {"b": {"path": "b.tif", "figures": {"dpi": "high"}}}})


def test_section_seed_overrides_the_top_level_seed():
    config = validate_config({"seed": 7, "figures": {"seed": 3}})
    assert stage_settings(config, "figures")["seed"] == 3


def test_validate_section_fills_defaults_without_touching_input():
    raw = {"dpi": 200}
    settings = validate_section("figures", raw)
    assert settings["formats"] == ["png", "svg"] and raw == {"dpi": 200}


def test_validate_config_cli(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"seed": 1}))
    assert main(["validate-config", str(good)]) == 0
    assert main(["validate-config", str(good), "--print"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["seed"] == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nmovis: {}\n")
    assert main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'movis'" in err and str(bad) in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1\n")
    assert main(["validate-config", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err

    assert main(["validate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
