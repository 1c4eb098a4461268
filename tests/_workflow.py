"""Running the Snakemake workflow from tests and benchmarks, and comparing two result folders.

Shared by tests/test_cluster.py, test_reproducibility.py, test_resume.py and bench/scale.py.
Every run works in its own folder (``--directory``), so the lock, ``.snakemake/`` and
``results/`` of a test never meet those of a developer running the demo in the checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rvae_tools.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SMALL_CONFIG = REPO / "tests" / "workflow_small.yaml"

# Results that carry wall-clock facts (logs, benchmark timings) or are drawings whose bytes
# hold dates: not part of "same config and seed give the same numbers".
_NOT_COMPARED_DIRS = {"logs", "benchmarks", "figures"}


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for a workflow run: this interpreter's `rvae-tools` and `snakemake` first
    on PATH (SLURM jobs inherit it), and one thread per math library so that results do not
    depend on how many cores a machine (or a SLURM allocation) happens to have."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(name, "1")
    env.update(extra)
    return env


def write_config(path: Path, overrides: dict[str, Any] | None = None, base: Path = SMALL_CONFIG) -> Path:
    """Write ``base`` (the small test workflow config) deep-merged with ``overrides``."""
    config = yaml.safe_load(base.read_text())
    config = deep_merge(config, overrides or {})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_args(workdir: Path, configfile: Path, *args: str) -> list[str]:
    """The command line of one workflow run in ``workdir`` with ``configfile``."""
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        *args,
    ]


def run_snakemake(
    workdir: Path, configfile: Path, *args: str, timeout: float = 600, check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the workflow; on failure the assertion message carries Snakemake's output tail."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        snakemake_args(workdir, configfile, *args),
        check=False, cwd=workdir, env=env or tool_env(), capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake exited {proc.returncode} in {workdir}:\n{_tail(proc.stdout + proc.stderr)}"
            + failed_logs(workdir)
        )
    return proc


def failed_logs(workdir: Path, limit: int = 3000) -> str:
    """The tails of the rule logs under results/logs (what a failing stage printed)."""
    out = []
    for log in sorted((workdir / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "error" in text.lower():
            out.append(f"\n--- {log}:\n{_tail(text, limit)}")
    return "".join(out)


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def planned_jobs(workdir: Path, configfile: Path, *targets: str) -> list[dict[str, Any]]:
    """Jobs of a dry run: ``[{"rule": name, "local": bool, "resources": {...}}, ...]``.

    Read from Snakemake's dry-run listing, so it shows the resources each rule really
    declares, which the cluster test checks against SLURM. ``local`` marks jobs Snakemake
    runs itself instead of submitting: localrules and target-only rules such as ``all``
    (no output, nothing to run).
    """
    proc = run_snakemake(workdir, configfile, "--dry-run", "--forceall", "--cores", "1",
                         "--workflow-profile", "none", *targets)
    jobs: list[dict[str, Any]] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(local)?rule (\w+):\s*$", line)
        if m:
            jobs.append({"rule": m.group(2), "local": bool(m.group(1)), "resources": {}, "output": False})
            continue
        if re.match(r"^\s+output: ", line) and jobs:
            jobs[-1]["output"] = True
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and jobs:
            for item in m.group(1).split(", "):
                key, _, value = item.partition("=")
                jobs[-1]["resources"][key] = value
    for job in jobs:
        job["local"] = job["local"] or not job.pop("output")
    if not jobs:
        raise AssertionError(f"no jobs found in the dry run:\n{_tail(proc.stdout + proc.stderr)}")
    return jobs


# --------------------------------------------------------------------------- comparison


def compare_results(a: Path, b: Path) -> list[str]:
    """Assert that two ``results/`` folders hold the same numbers; return what was compared.

    Zarr stores: every variable and coordinate exactly (NaN equal to NaN), plus the
    provenance that must agree (config hash, seed, version, commit). Parquet tables: every
    column exactly. TIFF movies: pixel arrays. Checkpoints: every tensor of the state dict.
    JSON and CSV: parsed values, except wall-clock columns/keys (names containing "time",
    "second" or "elapsed"). Logs, benchmarks and figures are not compared.
    """
    names_a = _result_files(a)
    names_b = _result_files(b)
    assert names_a == names_b, (
        f"different outputs: only in {a}: {sorted(names_a - names_b)}; only in {b}: {sorted(names_b - names_a)}"
    )
    compared = []
    for name in sorted(names_a):
        pa, pb = a / name, b / name
        kind = _compare_one(pa, pb)
        if kind:
            compared.append(f"{name} ({kind})")
    return compared


def _result_files(root: Path) -> set[str]:
    """Relative names of the outputs under ``root``: files, with Zarr stores as one entry."""
    found: set[str] = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in _NOT_COMPARED_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        if any(p.endswith(".zarr") for p in rel.parts[:-1]):
            continue  # inside a store; the store itself is the unit
        if path.is_dir() and not path.name.endswith(".zarr"):
            continue
        found.add(str(rel))
    return found


def _compare_one(pa: Path, pb: Path) -> str:
    name = pa.name
    if name.endswith(".zarr"):
        _compare_zarr(pa, pb)
        return "zarr"
    if name.endswith(".parquet"):
        import pandas as pd

        da, db = pd.read_parquet(pa), pd.read_parquet(pb)
        pd.testing.assert_frame_equal(da, db, check_exact=True, obj=str(pa))
        return "parquet"
    if name.endswith((".tif", ".tiff")):
        import tifffile

        np.testing.assert_array_equal(tifffile.imread(pa), tifffile.imread(pb), err_msg=str(pa))
        return "tiff"
    if name.endswith((".pt", ".pth")):
        _compare_checkpoint(pa, pb)
        return "checkpoint"
    if name.endswith(".json"):
        ja, jb = (_drop_clock(json.loads(p.read_text())) for p in (pa, pb))
        assert ja == jb, f"{pa} and {pb} differ"
        return "json"
    if name.endswith(".csv"):
        import pandas as pd

        da, db = pd.read_csv(pa), pd.read_csv(pb)
        keep = [c for c in da.columns if not _is_clock(c)]
        pd.testing.assert_frame_equal(da[keep], db[keep], check_exact=True, obj=str(pa))
        return "csv"
    if name.endswith(".npy"):
        np.testing.assert_array_equal(np.load(pa), np.load(pb), err_msg=str(pa))
        return "npy"
    return ""


_CLOCK = re.compile(r"time|second|elapsed|duration|date|per_s|throughput|(^|_)s$", re.IGNORECASE)


def _is_clock(key: str) -> bool:
    # frame_interval / time axis of the movie are data, not the clock of the run.
    return bool(_CLOCK.search(key)) and key not in ("frame_interval",)


def _drop_clock(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_clock(v) for k, v in obj.items() if not _is_clock(k)}
    if isinstance(obj, list):
        return [_drop_clock(v) for v in obj]
    return obj


# Provenance that must match between two runs of one config. Not compared: paths and the
# host, and model_checksum, the SHA-256 of the checkpoint file, which may hold training
# wall-clock times besides the weights (the weights themselves are compared tensor by tensor).
_PROVENANCE_EQUAL = ("config_hash", "seed", "rvae_tools_version", "git_commit")


def _compare_zarr(pa: Path, pb: Path) -> None:
    import xarray as xr

    with xr.open_zarr(pa) as da, xr.open_zarr(pb) as db:
        assert set(da.variables) == set(db.variables), (
            f"{pa}: variables {sorted(da.variables)} vs {sorted(db.variables)}"
        )
        for var in da.variables:
            xa, xb = da[var], db[var]
            assert xa.dims == xb.dims, f"{pa}:{var}: dims {xa.dims} vs {xb.dims}"
            va, vb = xa.values, xb.values
            assert va.dtype == vb.dtype, f"{pa}:{var}: dtype {va.dtype} vs {vb.dtype}"
            equal_nan = va.dtype.kind in "fc"
            assert np.array_equal(va, vb, equal_nan=equal_nan), f"{pa}:{var}: values differ"
        for key in _PROVENANCE_EQUAL:
            assert da.attrs.get(key) == db.attrs.get(key), (
                f"{pa}: attribute {key}: {da.attrs.get(key)!r} vs {db.attrs.get(key)!r}"
            )


def _compare_checkpoint(pa: Path, pb: Path) -> None:
    import torch

    ca = torch.load(pa, map_location="cpu", weights_only=True)
    cb = torch.load(pb, map_location="cpu", weights_only=True)
    sa = ca.get("state_dict", ca) if isinstance(ca, dict) else ca
    sb = cb.get("state_dict", cb) if isinstance(cb, dict) else cb
    assert set(sa) == set(sb), f"{pa}: state dict keys differ"
    for key in sa:
        if torch.is_tensor(sa[key]):
            assert torch.equal(sa[key], sb[key]), f"{pa}: tensor {key} differs"


# --------------------------------------------------------------------------- one shared run

_SHARED: dict[str, Path] = {}


def shared_small_run(tmp_path_factory) -> Path:
    """Folder of one complete local run of the small workflow (``results/`` inside), made
    once per test session and shared, so that the provenance and reproducibility tests do
    not each pay for a full run. Lives under pytest's temporary folder (pytest removes it)."""
    if "run" not in _SHARED:
        root = tmp_path_factory.mktemp("small_run")
        config = write_config(root / "config.yaml")
        run_snakemake(root / "run", config, "--cores", "2")
        _SHARED["config"] = config
        _SHARED["run"] = root / "run"
    return _SHARED["run"]


def shared_small_config() -> Path:
    """The config file of :func:`shared_small_run` (call that first)."""
    return _SHARED["config"]
