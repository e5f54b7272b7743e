"""One entry point for every data source: :func:`load`."""

from __future__ import annotations

import os
from pathlib import Path

from cnnkit.data.arrays import load_npz
from cnnkit.data.digits import load_digits
from cnnkit.data.folder import load_folder
from cnnkit.data.splits import DataSplits, InputHW, PathLike, check_split_options

SOURCES_HELP = (
    "'digits' (the bundled handwritten digits), a folder with one sub-folder of images per "
    "class, or a .npz file with 'images' and 'labels' arrays"
)


def load(
    source: PathLike, input_hw: InputHW, *, val_fraction: float = 0.2, seed: int = 0
) -> DataSplits:
    """Load a data source as train/validation(/test) splits fitted to ``input_hw``.

    Args:
        source: ``"digits"`` for the bundled digits (:func:`~cnnkit.data.digits.load_digits`;
            write ``./digits`` for a folder of that name), the path of an image folder
            (:func:`~cnnkit.data.folder.load_folder`) or of a ``.npz`` archive
            (:func:`~cnnkit.data.arrays.load_npz`).
        input_hw: ``(H, W)`` the network expects (an int for a square); every image is
            fitted to it keeping its aspect ratio (:mod:`cnnkit.data.images`).
        val_fraction: share of each class's training images drawn for validation, in (0, 1).
        seed: seed of that draw, >= 0.

    Returns:
        :class:`~cnnkit.data.splits.DataSplits` whose images are ``(N, 1, H, W)`` float32 in
        [0, 1] and labels ``(N,)`` int64. ``digest`` is the sha256 of the source's content:
        of the archive's bytes for ``digits`` and ``.npz``, and of the relative paths and
        bytes of the files tried for a folder.
    """
    input_hw, val_fraction, seed = check_split_options(input_hw, val_fraction, seed)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"data source must be a str or a path, got {type(source).__name__}")
    if isinstance(source, str) and source == "digits":
        return load_digits(input_hw, val_fraction=val_fraction, seed=seed)
    path = Path(source)
    if path.is_dir():
        return load_folder(path, input_hw, val_fraction=val_fraction, seed=seed)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(source)!r} does not exist; expected {SOURCES_HELP}"
        )
    if path.suffix.lower() != ".npz":
        raise ValueError(
            f"data source {str(source)!r} is not a folder or a .npz file; expected {SOURCES_HELP}"
        )
    return load_npz(path, input_hw, val_fraction=val_fraction, seed=seed)
