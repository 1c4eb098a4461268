"""The config schema: defaults, one-line errors naming the key, per-movie overrides."""

from __future__ import annotations

import json
import re

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


# --------------------------------------------------------------------------- strict files


def _one_line_error(path):
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert "the config file is empty" in _one_line_error(path)


def test_duplicate_key_names_the_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nwindows:\n  size: 24\n  edge: pad\n  size: 48\n")
    message = _one_line_error(path)
    assert "duplicate key 'size'" in message and "line 5" in message and "line 3" in message
    path.write_text("seed: 1\nfigures: {dpi: 100}\nseed: 2\n")
    assert "line 3: duplicate key 'seed'" in _one_line_error(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("figures: &f {dpi: 100}\nmovies:\n  m:\n    simulate: {}\n    figures: {<<: *f, dpi: 200}\n")
    config = load_config(path)
    assert stage_settings(config, "figures", "m")["dpi"] == 200


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\nwindows:\n  size: [32\n  edge: pad\n")
    message = _one_line_error(path)
    assert "not valid YAML" in message
    line, column = map(int, re.search(r"line (\d+), column (\d+)", message).groups())
    assert line in (3, 4, 5) and column >= 1
    path.write_text("seed: 1\n\tfigures: {}\n")  # a tab where YAML wants spaces
    assert "line 2, column 1" in _one_line_error(path)


def test_validate_config_cli_reports_line_of_duplicate(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "line 2: duplicate key 'seed'" in err


# --------------------------------------------------------------------------- cross-field checks


def _check(tmp_path, config):
    from rvae_tools.config import check_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError) as info:
        check_config(load_config(path), source=str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_window_larger_than_a_simulated_frame(tmp_path):
    message = _check(tmp_path, {"movies": {"m": {"simulate": {"height": 24, "width": 40}}}})
    assert "movies.m.windows.size: 32 px windows do not fit in the 24 x 40 px frames" in message


def test_window_larger_than_a_real_movies_cropped_frame(tmp_path):
    import numpy as np
    import tifffile

    movie = tmp_path / "movie.tif"
    tifffile.imwrite(movie, np.zeros((5, 64, 64), np.uint16), photometric="minisblack")
    # A set size is checked at once (auto is decided by the movie's inspection).
    message = _check(tmp_path, {"movies": {"m": {"path": str(movie), "crop": [0, 20, 0, 64], "windows": {"size": 32}}}})
    assert "movies.m.windows.size" in message and "20 x 64" in message
    message = _check(tmp_path, {"movies": {"m": {"path": str(movie), "crop": [0, 80, 0, 64]}}})
    assert "movies.m" in message and "crop" in message and "outside" in message
    message = _check(tmp_path, {"movies": {"m": {"path": str(movie), "crop": [30, 10, 0, 64]}}})
    assert "movies.m.crop" in message
    message = _check(tmp_path, {"movies": {"m": {"path": str(tmp_path / "nope.tif")}}})
    assert "movies.m.path" in message and "not found" in message
    from rvae_tools.config import check_config

    ok = load_config(_write(tmp_path / "ok.yaml", {"movies": {"m": {"path": str(movie), "crop": [0, 40, 0, 48]}}}))
    assert check_config(ok)["m"] == (5, 40, 48)


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def test_probability_windows_need_the_unet(tmp_path):
    message = _check(tmp_path, {"windows": {"source": "probability"},
                                "movies": {"m": {"simulate": {}, "segment": {"method": "locate"}}}})
    assert "movies.m: windows.source: probability" in message and "segment.method: locate" in message


def test_unavailable_device_is_reported_before_any_rule(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = _check(tmp_path, {"device": "cuda:1"})
    assert "device: 'cuda:1'" in message and "no CUDA device" in message
    path = _write(tmp_path / "d.yaml", {"device": "cuda"})
    assert main(["validate-config", str(path), "--no-device-check"]) == 0
