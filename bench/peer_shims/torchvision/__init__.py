"""Minimal stand-in for torchvision, for the peer benchmarks only.

PyPI's torchvision does not import next to the CPU torch wheel used here, and the peer
packages (pyroVED, AtomAI) import it at module load only for ``utils.make_grid``. This
package provides that one function; bench/rvae.py puts it on sys.path for the peers.
"""

from . import utils  # noqa: F401

__version__ = "0.0+rvae-tools-shim"
