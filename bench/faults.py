"""Fault injection: bad inputs, hostile config strings, and SIGKILL at random points of every
stage followed by a rerun.

1. Bad inputs: every case of the table in tests/_faults.py (configs, movies, tables, stores,
   checkpoints, settings, hostile strings) through ``rvae-tools``; each must exit 2 with one
   error line naming the file and the field, no traceback, nothing at the output path.
2. Hostile strings: every string-valued config key set to a shell-injection string; every
   rule's shell command as Snakemake renders it is executed with ``rvae-tools`` replaced by a
   recorder; a command that runs anything else counts as injected.
3. Kills: the small test workflow is run once uninterrupted (the reference). Then, for each
   stage, ``--forcerun STAGE`` is started and the whole Snakemake process group is SIGKILLed
   at a random point of that stage (a uniform fraction of its reference duration after its
   command started); ``snakemake --unlock`` and a plain rerun follow. The rerun must give
   outputs identical to the reference (every array, table, checkpoint tensor; see
   tests/_workflow.compare_results) and leave no temporary (``.NAME.tmp-*``, ``.NAME.old-*``).

Usage: python bench/faults.py [--kills-per-stage 2] [--seed 0] [--stages RULE ...] [--reference DIR]
                              [--no-kills] [--keep DIR]
The last line of the output is one JSON object with the counts.

Measured (commit 29f4a0f, shared 2-core machine): ``python -u bench/faults.py --kills-per-stage 3 --seed 1
--keep DIR``: 100 bad inputs, 100 clear errors, 0 tracebacks, 0 silent, 0 data loss; 49 rendered shell
commands, 0 injected; 33 kill trials over 11 stages (32 mid-stage), 33 reruns identical, 0 leftovers;
reference run 239 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _faults
import _workflow

LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-\d+-[0-9a-f]+$")


def bad_inputs(root: Path) -> dict:
    fixtures = _faults.build_fixtures(root / "fixtures")
    outcomes = []
    for case in _faults.all_cases():
        if "no-cuda" in case.tags:
            import torch

            if torch.cuda.is_available():
                continue
        outcome = _faults.run_case(case, root / "cases", fixtures)
        outcomes.append((case, outcome))
        mark = "ok " if outcome.verdict == "clear" else "BAD"
        print(f"  {mark} {outcome.verdict:9s} {case.name}" + (f"  [{outcome.detail}]" if outcome.detail else ""), flush=True)
    verdicts = Counter(outcome.verdict for _, outcome in outcomes)
    failing = [
        {"case": case.name, "verdict": outcome.verdict, "detail": outcome.detail, "owner": case.owner}
        for case, outcome in outcomes if outcome.verdict != "clear"
    ]
    return {"tried": len(outcomes), "verdicts": dict(verdicts), "failing": failing}


def hostile_strings(root: Path) -> dict:
    import test_shell_quoting as quoting

    work = root / "hostile"
    work.mkdir(parents=True)
    config = quoting._hostile_config(work)
    configfile = root / "hostile.yaml"
    import yaml

    configfile.write_text(yaml.safe_dump(config))
    jobs = quoting._rendered_commands(work, configfile)
    stubs, records = root / "bin", root / "records"
    stubs.mkdir()
    records.mkdir()
    (stubs / "rvae-tools").write_text(quoting.RECORDER)
    (stubs / "rvae-tools").chmod(0o755)
    env = {**_workflow.tool_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(records)}
    injected, failed = [], []
    for i, (rule, command, log) in enumerate(jobs):
        if log:
            (work / log).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, timeout=60, check=False)
        if list(work.rglob("PWNED*")) or len(list(records.iterdir())) != i + 1:
            injected.append(rule)
            for path in work.rglob("PWNED*"):
                path.unlink()
        elif proc.returncode != 0:
            failed.append(rule)
    rules = sorted({rule for rule, _, _ in jobs})
    print(f"  {len(jobs)} rendered commands of {len(rules)} rules ({', '.join(rules)}); injected: {len(injected)}")
    return {"commands": len(jobs), "rules": rules, "injected": len(injected), "injected_rules": injected,
            "command_failed": failed}


def _snakemake(workdir: Path, configfile: Path, *args: str) -> list[str]:
    # The workflow's default profile, as a user's `snakemake --cores 2` has it: it reruns the
    # jobs a kill left incomplete (rerun-incomplete) instead of stopping.
    return _workflow.snakemake_args(workdir, configfile, *args)


def _leftovers(results: Path) -> list[str]:
    return [str(p.relative_to(results)) for p in results.rglob(".*") if LEFTOVER.match(p.name)]


def _stage_durations(results: Path) -> dict[str, float]:
    durations = {}
    for tsv in sorted((results / "benchmarks").glob("*/*.tsv")):
        lines = tsv.read_text().splitlines()
        seconds = float(lines[1].split("\t")[0])
        durations[tsv.parent.name] = max(durations.get(tsv.parent.name, 0.0), seconds)
    return durations


def _wait_started(logs: Path, since: float, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until a log of the stage is (re)written after ``since``: its command started."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(log.stat().st_mtime >= since for log in logs.glob("*.log")) if logs.is_dir() else False:
            return True
        time.sleep(0.05)
    return False


def kills(root: Path, per_stage: int, seed: int, only: list[str] | None = None, reference: Path | None = None) -> dict:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    # The CPU, so that reruns are bit-identical (GPU kernels need not be).
    configfile = _workflow.write_config(root / "config.yaml", {"device": "cpu"})
    env = _workflow.tool_env()
    ref = root / "reference"
    if reference is not None:
        shutil.copytree(reference, ref, symlinks=True)
        print(f"  reference run: {reference} (given)", flush=True)
    else:
        start = time.perf_counter()
        _workflow.run_snakemake(ref, configfile, "--cores", "2", timeout=3600)
        print(f"  reference run: {time.perf_counter() - start:.0f} s", flush=True)
    durations = _stage_durations(ref / "results")
    order = ["simulate", "ingest", "inspect", "train_segmenter", "segment", "track", "windows", "train", "encode",
             "dynamics", "figures"]
    # Last stages first: they are the cheapest to rerun, so a run cut short covers the most.
    stages = sorted(durations, key=lambda s: order.index(s) if s in order else len(order), reverse=True)
    if only:
        stages = [s for s in stages if s in only]
    work = root / "work"
    shutil.copytree(ref, work, symlinks=True)
    trials = []
    for stage in stages:
        for _ in range(per_stage):
            fraction = rng.uniform(0.05, 0.95)
            since = time.time()
            proc = subprocess.Popen(_snakemake(work, configfile, "--cores", "2", "--forcerun", stage),
                                    cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            started = _wait_started(work / "results" / "logs" / stage, since, proc, timeout=600)
            if started:
                time.sleep(fraction * durations[stage])
            mid_stage = proc.poll() is None
            if mid_stage:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            subprocess.run(_snakemake(work, configfile, "--unlock"), cwd=work, env=env, capture_output=True, check=False)
            rerun = subprocess.run(_snakemake(work, configfile, "--cores", "2"), cwd=work, env=env,
                                   capture_output=True, text=True, check=False, timeout=3600)
            leftovers = _leftovers(work / "results")
            try:
                if rerun.returncode != 0:
                    raise AssertionError(f"rerun exited {rerun.returncode}: {(rerun.stdout + rerun.stderr)[-800:]}")
                _workflow.compare_results(ref / "results", work / "results")
                identical, why = True, ""
            except AssertionError as exc:
                identical, why = False, str(exc).splitlines()[0][:300]
            trial = {"stage": stage, "fraction": round(fraction, 3), "killed_mid_stage": mid_stage,
                     "identical": identical, "leftovers": leftovers, "why": why}
            trials.append(trial)
            print(f"  kill {stage:16s} at {fraction:4.2f} of {durations[stage]:5.1f} s: "
                  f"{'killed' if mid_stage else 'finished first'}, rerun "
                  f"{'identical' if identical else 'DIFFERENT: ' + why}, leftovers {len(leftovers)}", flush=True)
    return {
        "stages": stages,
        "trials": len(trials),
        "killed_mid_stage": sum(t["killed_mid_stage"] for t in trials),
        "identical": sum(t["identical"] for t in trials),
        "different": [t for t in trials if not t["identical"]],
        "with_leftovers": sum(bool(t["leftovers"]) for t in trials),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills-per-stage", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kills", action="store_true", help="only bad inputs and hostile strings")
    parser.add_argument("--stages", nargs="+", metavar="RULE", help="kill only these stages (default: every stage)")
    parser.add_argument("--reference", metavar="DIR", type=Path,
                        help="a finished uninterrupted run of the same config (the kills folder's 'reference') to reuse")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rvae-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print("bad inputs:")
        bad = bad_inputs(root / "bad")
        print("hostile config strings:")
        hostile = hostile_strings(root / "shell")
        killed = None
        if not args.no_kills:
            print("kills:")
            killed = kills(root / "kills", args.kills_per_stage, args.seed, args.stages, args.reference)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    verdicts = bad["verdicts"]
    summary = {
        "bad_inputs_tried": bad["tried"],
        "clear_errors": verdicts.get("clear", 0),
        "unclear_errors": verdicts.get("unclear", 0),
        "tracebacks": verdicts.get("traceback", 0),
        "silent_wrong_results": verdicts.get("silent", 0),
        "data_loss_cases": verdicts.get("data_loss", 0),
        "injected_by_cli_args": verdicts.get("injected", 0),
        "failing_cases": bad["failing"],
        "shell_commands_rendered": hostile["commands"],
        "shell_commands_injected": hostile["injected"],
    }
    if killed is not None:
        summary.update({
            "kill_stages": killed["stages"],
            "kill_trials": killed["trials"],
            "killed_mid_stage": killed["killed_mid_stage"],
            "reruns_identical": killed["identical"],
            "reruns_different": killed["different"],
            "reruns_with_leftovers": killed["with_leftovers"],
        })
        # A lost output shows as a rerun that differs from the reference (missing file).
        summary["data_loss_cases"] += len(killed["different"])
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
