"""The peer rVAE libraries for the benchmarks, installed once into ``.peers`` beside the checkout.

They go in with ``pip --no-deps --target`` so the project's own pinned environment is never
changed; ``bench/peer_shims`` stands in for the few heavy imports they do not need.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
SHIMS = ROOT / "bench" / "peer_shims"

#: pyroVED and the pure-Python packages it imports (pip's --no-deps installs only what is named).
PYROVED_PACKAGES = ["pyroved==0.3.0", "pyro-ppl", "pyro-api", "opt_einsum", "gpytorch", "linear_operator",
                    "jaxtyping", "wadler_lindig", "mpmath"]
#: AtomAI and what it imports beyond pyroVED's packages.
ATOMAI_PACKAGES = ["atomai==0.8.1", "opencv-python-headless", "progressbar2", "python-utils", "mendeleev==0.6.1",
                   "six", "sqlalchemy", "pyfiglet", "colorama"]


def ensure_peers(packages: list[str], imports: str) -> str | None:
    """Install ``packages`` into .peers unless ``imports`` (e.g. "pyroved.models") already works.

    Returns None when the modules import, else the reason they cannot (pip's or Python's last line).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SHIMS), str(PEERS)]))
    probe = [sys.executable, "-c", f"import {imports}"]
    if subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0:
        return None
    print(f"installing {imports} into {PEERS} (--no-deps, once) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(PEERS), *packages]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return "pip failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    check = subprocess.run(probe, env=env, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        return "import failed: " + (check.stderr.strip().splitlines() or ["?"])[-1]
    return None
