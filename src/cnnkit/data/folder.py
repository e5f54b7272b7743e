"""Image folders: one sub-folder of images per class (the layout of Caltech-101's
``101_ObjectCategories``).

::

    ROOT/
        airplanes/  image_0001.jpg  image_0002.jpg ...
        anchor/     image_0001.jpg ...
        ...

Class names are the sub-folder names in sorted order; class ``k`` is the ``k``-th of them.
Every regular file in a class folder is tried as an image (any format Pillow reads, any
mode; see :mod:`cnnkit.data.images` for the gray conversion and the fit to the input size).
Names starting with ``.`` (hidden files and folders) are skipped silently, as are files
directly in ROOT and folders nested inside a class folder. Files that cannot be read or
decoded are skipped and listed, each with its reason, in one
:class:`UnreadableFilesWarning`. A missing ROOT, a ROOT with no class folders or with only
one, and a class folder with no readable image are errors. The folder has no test split.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from cnnkit.data.images import decode_image, prepare_image
from cnnkit.data.splits import DataSplits, ImageSet, InputHW, PathLike, check_split_options


class UnreadableFilesWarning(UserWarning):
    """Some files of an image folder were skipped because they are not readable images."""


def load_folder(
    path: PathLike, input_hw: InputHW, *, val_fraction: float = 0.2, seed: int = 0
) -> DataSplits:
    """Load an image folder as train/validation splits of ``(N, 1, H, W)`` images.

    ``digest`` is a sha256 over every file tried, in sorted order: its path relative to
    ``path`` (with ``/``), its length and its bytes. The validation split follows
    :func:`cnnkit.data.splits.stratified_split`, so each class needs 2 readable images.
    """
    input_hw, val_fraction, seed = check_split_options(input_hw, val_fraction, seed)
    root = Path(path).resolve()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one sub-folder of images per class")
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise ValueError(
            f"image folder {root} has no class sub-folders; expected one sub-folder of "
            "images per class (the layout of Caltech-101's 101_ObjectCategories)"
        )
    if len(class_dirs) == 1:
        raise ValueError(
            f"image folder {root} has only one class sub-folder ({class_dirs[0].name!r}); "
            "a classifier needs at least 2"
        )

    digest = hashlib.sha256()
    images: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: list[str] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            (p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        readable = 0
        for file in files:
            try:
                data = file.read_bytes()
            except OSError as error:
                skipped.append(f"{file}: cannot be read ({error.strerror or error})")
                continue
            digest.update(f"{file.relative_to(root).as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
            try:
                images.append(prepare_image(decode_image(data), input_hw))  # (1, H, W)
            except ValueError as error:
                skipped.append(f"{file}: {error}")
                continue
            labels.append(label)
            readable += 1
        if readable == 0:
            empty.append(
                f"{class_dir.name!r} (no files)"
                if not files
                else f"{class_dir.name!r} ({len(files)} files, none readable)"
            )

    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} file(s) in {root} that are not readable images:\n  "
            + "\n  ".join(skipped),
            UnreadableFilesWarning,
            stacklevel=2,
        )
    if empty:
        raise ValueError(
            f"image folder {root}: every class folder needs readable images; "
            f"empty: {', '.join(empty)}"
        )

    class_names = [d.name for d in class_dirs]
    full = ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), class_names)
    return DataSplits.drawn(
        full, None, val_fraction, seed, source=str(root), digest=digest.hexdigest(), kind="folder"
    )
