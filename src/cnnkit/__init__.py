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

from cnnkit.models import build, from_name, list_presets  # noqa: E402
from cnnkit.runtime import tune_runtime  # noqa: E402
from cnnkit.training import fit, load_run  # noqa: E402

__all__ = ["__version__", "build", "fit", "from_name", "list_presets", "load_run", "tune_runtime"]
