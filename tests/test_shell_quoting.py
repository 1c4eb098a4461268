"""No config value can inject a shell command: every rule's shell command, rendered by
Snakemake with hostile strings in every string-valued config key, runs exactly one
`rvae-tools` call with those strings intact as arguments; `device` and `results` are
restricted by the schema; `results` outside the working directory needs an opt-in."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _workflow import SNAKEFILE, tool_env

from rvae_tools.config import load_schema, validate_config
from rvae_tools.errors import InputError

REPO = Path(__file__).resolve().parents[1]

# Command substitution (both forms), separators, pipes, redirections, quotes and globs. No
# newline (Snakemake prints one command per line) and no braces (Snakemake reads them as
# wildcards in file paths, which it refuses before any shell is involved).
HOSTILE = "x $(touch PWNED1) `touch PWNED2` ; touch PWNED3 && touch PWNED4 | tee PWNED5 > PWNED6 \"q\" 'q' * ~"

RECORDER = """#!/bin/sh
# stands in for rvae-tools: records its arguments, NUL-separated, one file per call
n=$(printf '%04d' "$(ls "$RECORD_DIR" | wc -l)")
printf '%s\\0' "$@" > "$RECORD_DIR/call-$n"
"""


def _string_keys(schema, path=()):
    """Key paths of every free string value in the schema ('[]' = each item of a list)."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    found = []
    if "string" in types and "enum" not in schema:
        found.append((path, schema))
    for key, sub in schema.get("properties", {}).items():
        found += _string_keys(sub, (*path, key))
    if isinstance(schema.get("items"), dict):
        found += _string_keys(schema["items"], (*path, "[]"))
    return found


def _set(config, path, value, schema):
    """Set ``value`` at ``path`` in ``config``, creating sections and taking list defaults."""
    node, sub = config, schema
    for i, key in enumerate(path[:-1]):
        sub = sub["properties"][key] if key != "[]" else sub["items"]
        if path[i + 1] == "[]":
            node.setdefault(key, copy.deepcopy(sub.get("default") or [{}]))
            for item in node[key]:
                _set(item, path[i + 2:], value, sub["items"])
            return
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _hostile_config(work: Path) -> dict:
    schema = load_schema()
    restricted = {"results", "device"}
    keys = _string_keys(schema)
    top = [(p, s) for p, s in keys if p[0] not in restricted]
    assert {p[0] for p, _ in keys} >= restricted
    movie_keys = [p for p, _ in _string_keys(schema["$defs"]["movie"])]

    # The files that hostile paths name exist, so that Snakemake plans every job.
    movie = work / f"{HOSTILE}.npz"
    np.savez(movie, **{HOSTILE: np.zeros((3, 40, 40), np.float32)})
    checkpoint = work / f"{HOSTILE}.pt"
    checkpoint.write_bytes(b"")
    (work / HOSTILE / "a").mkdir(parents=True)  # movies.real.labels: a folder of labelled window images

    config: dict = {"movies": {}}
    for path, _ in top:
        if path[0] == "movies":
            continue
        _set(config, path, HOSTILE, schema)
    # segment.checkpoint globally would skip every segmenter training: set per movie below.
    config["segment"].pop("checkpoint")
    config["simulate"]["frames"] = 3
    config["dynamics"]["species"] = [{"name": HOSTILE, "symmetry": 2, "cls": HOSTILE}]
    real = {"path": str(movie.relative_to(work))}
    for path in movie_keys:
        if path[0] != "path" and len(path) == 1:
            real[path[0]] = HOSTILE
    real["segment"] = {"method": "unet", "train": {"source": "pseudo"}}
    real["windows"] = {"source": "probability"}
    config["movies"] = {
        "real": real,  # ingest, inspect, pseudo-label segmenter training, segment, windows from probability
        "plain": {"path": str(movie.relative_to(work))},  # inspect, segment_classical (a user movie's default)
        "sim": {"simulate": {}},  # simulate, segmenter training on the movie's simulator
        "ckpt": {"simulate": {}, "segment": {"checkpoint": str(checkpoint.relative_to(work))}},
        "loc": {"simulate": {}, "segment": {"method": "locate"}},  # segment_locate
        "chunked": {"simulate": {}, "segment": {"frame_chunk": 2}},  # segment_chunk x 2, segment_gather
        # segment_chunk_detector x 2, segment_gather_detector (a user movie's classical detector)
        "plainchunked": {"path": str(movie.relative_to(work)), "segment": {"frame_chunk": 2}},
    }
    return config


def _rules_defined() -> set[str]:
    names = set()
    for smk in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        names |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.MULTILINE))
    return names - {"all"}


def _rendered_commands(work: Path, configfile: Path) -> list[tuple[str, str, str | None]]:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(work),
         "--configfile", str(configfile), "--dry-run", "--printshellcmds", "--forceall",
         "--cores", "1", "--workflow-profile", "none"],
        cwd=work, env=tool_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs, rule, log = [], None, None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if m:
            rule, log = m.group(1), None
        m = re.match(r"^\s+log: (.*)$", line)
        if m:
            log = m.group(1)
        if line.startswith("Shell command: ") and rule != "all":  # all has no command
            jobs.append((rule, line[len("Shell command: "):], log))
    return jobs


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_hostile_config_values_never_reach_the_shell_unquoted(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = _hostile_config(work)
    configfile = tmp_path / "hostile.yaml"
    configfile.write_text(yaml.safe_dump(config))

    jobs = _rendered_commands(work, configfile)
    assert {rule for rule, _, _ in jobs} >= _rules_defined(), "every rule's command is rendered"

    stubs, records = tmp_path / "bin", tmp_path / "records"
    stubs.mkdir()
    records.mkdir()
    (stubs / "rvae-tools").write_text(RECORDER)
    (stubs / "rvae-tools").chmod(0o755)
    env = {**tool_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(records)}
    received: dict[str, set[str]] = {}
    for i, (rule, command, log) in enumerate(jobs):
        if log:
            (work / log).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, timeout=30, check=False,
                              capture_output=True, text=True)
        leaked = [*work.rglob("PWNED*"), *tmp_path.glob("PWNED*")]
        assert not leaked, f"{rule}: a config value ran a command ({leaked}): {command}"
        assert proc.returncode == 0, f"{rule}: {proc.stderr}\n{command}"
        calls = sorted(records.iterdir())
        assert len(calls) == i + 1, f"{rule}: the command ran rvae-tools {len(calls) - i} times: {command}"
        args = calls[-1].read_bytes().split(b"\0")[:-1]
        strings = set()
        for arg in (a.decode() for a in args):
            strings.add(arg)
            try:
                strings |= set(_strings(json.loads(arg)))
            except ValueError:
                pass
        received.setdefault(rule, set()).update(strings)

    # The hostile strings arrived intact, as single arguments or inside the settings JSON.
    for rule in ("ingest", "simulate", "train_segmenter", "segment", "segment_locate", "segment_chunk", "segment_chunk_detector", "dynamics"):
        assert HOSTILE in received[rule] or f"{HOSTILE}.npz" in received[rule] or f"{HOSTILE}.pt" in received[rule], rule
    assert f"{HOSTILE}.npz" in received["ingest"]
    assert f"{HOSTILE}.pt" in received["segment"]


@pytest.mark.parametrize(
    "value", ["$(touch x)cpu", "cpu; touch x", "`id`", "cuda:x", "GPU", "cuda:0 ", "-cpu", ""],
)
def test_device_is_one_of_the_documented_values(value):
    with pytest.raises(InputError, match=r"^my\.yaml: device: .*expected auto, cpu, cuda, cuda:N"):
        validate_config({"device": value}, source="my.yaml")


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_documented_devices_are_valid(value):
    assert validate_config({"device": value})["device"] == value


@pytest.mark.parametrize(
    "value", ["out$(touch x)", "a b", "res;ults", "`id`", "-rf", "~/results", "r|s", "r>s", "r&s", "r'", 'r"', ""],
)
def test_results_has_no_shell_metacharacters(value):
    with pytest.raises(InputError, match=r"^my\.yaml: results: "):
        validate_config({"results": value}, source="my.yaml")


def test_results_outside_the_working_directory_needs_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("../x", "../../x", "a/../../x", str(tmp_path.parent / "elsewhere")):
        with pytest.raises(InputError, match=r"results: .* is outside the working directory.*results_outside_workdir"):
            validate_config({"results": value}, source="my.yaml")
        config = validate_config({"results": value, "results_outside_workdir": True})
        assert config["results"] == value
    for value in ("results", "out/run-1", "a/../b", str(tmp_path / "inside")):
        assert validate_config({"results": value})["results"] == value
