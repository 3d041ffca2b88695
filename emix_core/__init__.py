"""emix: an open, vendor-neutral exchange of medical images and reports."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emix-core")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
