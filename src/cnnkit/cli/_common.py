"""What several verbs do around their one library call: read the spec they were given,
hold the run folder they write into, and print the data loader's warnings."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path


def load_spec(args: argparse.Namespace, default: str = "lecun83"):
    """The network of ``--spec FILE`` or ``--preset NAME``, else the preset ``default``."""
    from cnnkit.models import ArchitectureSpec, from_name

    if args.spec is not None:
        return ArchitectureSpec.load(args.spec)
    return from_name(args.preset or default)


def writer_lock(folder: str, out: str | None) -> contextlib.AbstractContextManager:
    """The run folder's lock for a verb that writes its file into the folder (no
    ``--out``): one writer per run folder, as for ``train``."""
    from cnnkit._files import FolderLock

    if out is None and Path(folder).is_dir():
        return FolderLock(folder)
    return contextlib.nullcontext()


@contextlib.contextmanager
def data_warnings_as_lines() -> Iterator[None]:
    """Print the data loader's warnings (skipped files) as ``cnnkit: warning: ...``."""
    from cnnkit.data import UnreadableFilesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableFilesWarning)
        yield
    for warning in caught:
        print(f"cnnkit: warning: {warning.message}", file=sys.stderr)
