"""`rvae-tools provenance PATH` tells a reader, years later, what made a result.

On the outputs of a real (small) workflow run it must print, for a Zarr store, a Parquet
table and a model checkpoint: the package version, the git commit, the hash of the settings
the stage ran with (and that hash must be the settings' hash), the seed, the library versions,
and for stores made with a model that model's checksum (the SHA-256 of the checkpoint file).
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from _workflow import REPO, shared_small_config, shared_small_run, tool_env

import rvae_tools
from rvae_tools.config import movie_frames, stage_settings, validate_config, without_workflow_keys
from rvae_tools.inspect import resolve_settings
from rvae_tools.io import table_metadata
from rvae_tools.provenance import config_hash, file_sha256
from rvae_tools.track import resolve_min_length

pytestmark = pytest.mark.slow

# Which config section a stage's settings come from (the stages that run on a config section).
_SECTION = {"track": "track", "windows": "windows", "train": "rvae", "encode": "rvae",
            "dynamics": "dynamics", "segment": "segment", "train_segmenter": "segment"}


def _provenance(path: Path) -> dict[str, str]:
    """What `rvae-tools provenance PATH` prints, as key -> value text."""
    proc = subprocess.run(
        ["rvae-tools", "provenance", str(path)],
        check=False, capture_output=True, text=True, env=tool_env(), timeout=120,
    )
    assert proc.returncode == 0, f"rvae-tools provenance {path} exited {proc.returncode}: {proc.stderr}"
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key] = value
    return out


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _check_common(path: Path, prov: dict[str, str], config: dict) -> None:
    assert prov.get("rvae_tools_version") == rvae_tools.__version__, (path, prov)
    head = _git_head()
    if head:
        assert prov.get("git_commit") in (head, f"{head}-dirty"), (path, prov.get("git_commit"), head)
    libraries = json.loads(prov["library_versions"])
    for name in ("numpy", "xarray", "zarr", "torch"):
        assert libraries.get(name) == version(name), (path, name, libraries)
    recorded = json.loads(prov["config"])
    assert prov["config_hash"] == config_hash(recorded), f"{path}: config_hash is not the hash of its config"
    section = _SECTION.get(prov.get("stage", ""))
    if section:
        # A simulated movie has no inspection: every `auto` setting takes its documented fallback,
        # and the store records the value it used; keys that only split the stage into jobs
        # (segment.frame_chunk) never reach the command.
        settings, _ = resolve_settings(section, without_workflow_keys(section, stage_settings(config, section, "demo")))
        if section == "track":  # min_length `auto` follows the movie's length
            settings = resolve_min_length(settings, movie_frames(config, "demo"))
        assert prov["config_hash"] == config_hash(settings), (
            f"{path}: config_hash {prov['config_hash']} != hash of the '{section}' settings of the run"
        )
        assert int(prov["seed"]) == settings["seed"], (path, prov.get("seed"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = shared_small_run(tmp_path_factory)
    config = validate_config(yaml.safe_load(shared_small_config().read_text()))
    return folder / "results", config


def test_zarr_stores(run):
    results, config = run
    stores = sorted((results / "demo").glob("*.zarr"))
    assert stores, f"no Zarr stores under {results / 'demo'}"
    checkpoints = {file_sha256(p) for p in results.rglob("*.pt")}
    for store in stores:
        prov = _provenance(store)
        _check_common(store, prov, config)
        if store.name != "movie.zarr":  # ingest runs no random code; every later stage is seeded
            assert "seed" in prov, f"{store}: no seed recorded"
        if store.name == "latents.zarr":
            assert prov.get("model_checksum") in checkpoints, (
                f"{store}: model_checksum {prov.get('model_checksum')} is no checkpoint's SHA-256"
            )


def test_parquet_table(run):
    results, config = run
    tables = [p for p in sorted((results / "demo").glob("*.parquet")) if "rvae_tools_version" in table_metadata(p)]
    if not tables:
        if not (results / "demo" / "tracks.parquet").exists():
            pytest.skip("no stage writing a Parquet table with provenance (track) in the workflow yet")
        pytest.fail(f"{results / 'demo' / 'tracks.parquet'} carries no provenance")
    for table in tables:
        _check_common(table, _provenance(table), config)


def test_checkpoint(run):
    results, config = run
    # Trained models (the rVAE, the segmenter); the trainer's per-epoch resume states under
    # <model>.checkpoints/<fingerprint>/ are working files, not results.
    checkpoints = sorted(p for p in results.rglob("*.pt")
                         if not any(part.endswith(".checkpoints") for part in p.relative_to(results).parts))
    if not checkpoints:
        pytest.skip("no network-training rule (train) in the workflow yet")
    for ckpt in checkpoints:
        prov = _provenance(ckpt)
        _check_common(ckpt, prov, config)


def test_unknown_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    proc = subprocess.run(["rvae-tools", "provenance", str(bad)],
                          check=False, capture_output=True, text=True, env=tool_env(), timeout=60)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
