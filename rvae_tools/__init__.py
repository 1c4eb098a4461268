"""rvae-tools: rotationally invariant particle dynamics for microscopy movies of self-assembly."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rvae-tools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"
