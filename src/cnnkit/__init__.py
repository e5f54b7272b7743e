"""cnnkit: LeCun's multi-stage convolutional network and every construct of the lecture.

The public face of the package: it re-exports the names users call and defines nothing.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
