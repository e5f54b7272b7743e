"""cnnkit: LeCun's multi-stage convolutional network and every construct of the lecture.

The public face of the package: it re-exports the names users call and defines nothing.
Submodules: :mod:`cnnkit.ops` (functions), :mod:`cnnkit.nn` (modules), :mod:`cnnkit.tables`,
:mod:`cnnkit.tying`, :mod:`cnnkit.models`, :mod:`cnnkit.data`, :mod:`cnnkit.training`,
:mod:`cnnkit.analysis`, :mod:`cnnkit.figures`, :mod:`cnnkit.reference`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The names below are imported on first use, so ``import cnnkit`` (and the command line,
# before it knows what it will do) does not pay for importing torch.
_EXPORTS = {
    "build": "cnnkit.models",
    "from_name": "cnnkit.models",
    "list_presets": "cnnkit.models",
    "tune_runtime": "cnnkit.runtime",
    "fit": "cnnkit.training",
    "load_run": "cnnkit.training",
}

__all__ = ["__version__", "build", "fit", "from_name", "list_presets", "load_run", "tune_runtime"]


_SUBMODULES = (
    "analysis",
    "data",
    "figures",
    "models",
    "nn",
    "ops",
    "reference",
    "runtime",
    "tables",
    "training",
    "tying",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"cnnkit.{name}")
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
