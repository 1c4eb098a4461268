"""Loading a benchmark script of ``bench/`` as a module, for tests of its scoring conventions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/{name}.py`` imported as a module (the scripts are not a package).

    ``bench/`` goes on ``sys.path``, as for a script run from there, so the scripts' imports of
    each other resolve.
    """
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
