"""Image sets stored as NumPy arrays in a ``.npz`` archive.

An archive holds either

* ``images`` and ``labels`` — every image is a training image; a validation split is
  drawn from them and there is no test split; or
* ``train_images`` and ``train_labels``, optionally with ``test_images`` and
  ``test_labels`` — a fixed test split kept apart (the bundled digits use this layout);

and optionally ``class_names``, a 1-D array of strings (fixed-width unicode, e.g. ``<U10``);
without it the classes are named ``"0"``, ``"1"``, ... up to the largest label. Other arrays
are ignored.

Images are ``(N, h, w)`` or ``(N, 1, h, w)``, either ``uint8`` gray levels (or another
integer dtype holding 0..255) or floats in [0, 1]; labels are ``(N,)`` non-negative integers,
one per image. Every class must have at least 2 training images. Archives are read with
``allow_pickle=False``: an array of Python objects is refused, never unpickled. Arrays with
NaN or infinite values, labels that do not match the images one to one, labels that are not
integers or are negative, and arrays of the wrong rank are refused with a ``ValueError``
that names the file and the array.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.images import fit_to_size, unit_pixels
from cnnkit.data.splits import DataSplits, ImageSet, InputHW, PathLike, check_split_options


@dataclass
class ArrayData:
    """The checked content of an archive, at its own image size.

    ``*_images`` are ``(N, h, w)`` float32 in [0, 1]; ``*_labels`` ``(N,)`` int64.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]

    def to_image_sets(self, input_hw: tuple[int, int]) -> tuple[ImageSet, ImageSet | None]:
        """``(train, test)`` image sets fitted to ``input_hw`` (see ``fit_to_size``)."""
        train = _image_set(self.train_images, self.train_labels, self.class_names, input_hw)
        if self.test_images is None or self.test_labels is None:
            return train, None
        return train, _image_set(self.test_images, self.test_labels, self.class_names, input_hw)


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _check_archive_kind(path: Path) -> None:
    """Refuse a file that is neither a zip archive nor a ``.npy`` array, by its first
    bytes: what numpy would otherwise try as a pickle (text, pickles, anything else)."""
    with open(path, "rb") as stream:
        head = stream.read(6)
    if head.startswith(_ZIP_MAGIC) or head == _NPY_MAGIC:
        return
    if not head:
        raise ValueError(f"{path} is empty, not a .npz archive")
    kind = "a pickle" if head[:1] == b"\x80" else "not a zip file"
    raise ValueError(
        f"{path} is not a .npz archive ({kind}); a .npz is a zip of .npy arrays, as "
        "numpy.savez writes (pickled data is never loaded)"
    )


def read_npz(path: str | os.PathLike[str]) -> ArrayData:
    """Read and check a ``.npz`` archive laid out as this module's docstring says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist")
    _check_archive_kind(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz archive: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single .npy array, not a .npz archive of named arrays")
    with archive:
        names = set(archive.files)

        def get(key: str) -> np.ndarray:
            try:
                return archive[key]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise ValueError(
                        f"{path}: array {key!r} holds Python objects, which are never "
                        "unpickled; store numbers, and class names as fixed-width strings"
                    ) from None
                raise ValueError(f"{path}: array {key!r} cannot be read: {error}") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise ValueError(f"{path}: array {key!r} cannot be read: {error}") from None

        if "images" in names and "train_images" in names:
            raise ValueError(
                f"{path} holds both 'images' and 'train_images'; use one layout or the other"
            )
        prefix = "" if "images" in names else "train_"
        required = {f"{prefix}images", f"{prefix}labels"}
        if not required <= names:
            raise ValueError(
                f"{path} must hold the arrays 'images' and 'labels' (or 'train_images' and "
                f"'train_labels'); it holds {sorted(names)}"
            )
        train_images = _check_images(get(f"{prefix}images"), f"{path}: {prefix}images")
        train_labels = _check_labels(
            get(f"{prefix}labels"), len(train_images), f"{path}: {prefix}labels"
        )
        test_images = test_labels = None
        if prefix and ({"test_images", "test_labels"} & names):
            if not {"test_images", "test_labels"} <= names:
                raise ValueError(
                    f"{path} must hold both 'test_images' and 'test_labels' or neither"
                )
            test_images = _check_images(get("test_images"), f"{path}: test_images")
            test_labels = _check_labels(
                get("test_labels"), len(test_images), f"{path}: test_labels"
            )
            if test_images.shape[1:] != train_images.shape[1:]:
                raise ValueError(
                    f"{path}: test_images must have the size of train_images "
                    f"{train_images.shape[1:]}, got {test_images.shape[1:]}"
                )
        class_names = None
        if "class_names" in names:
            class_names = _check_class_names(get("class_names"), f"{path}: class_names")

    largest = int(max(train_labels.max(), test_labels.max() if test_labels is not None else -1))
    if class_names is None:
        if largest >= len(train_labels):
            raise ValueError(
                f"{path}: labels go up to {largest} with only {len(train_labels)} training "
                "images, so some classes have none; number the classes 0, 1, 2, ..."
            )
        class_names = [str(c) for c in range(largest + 1)]
    elif largest >= len(class_names):
        raise ValueError(
            f"{path}: labels go up to {largest} but class_names names only "
            f"{len(class_names)} classes"
        )
    if len(class_names) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 classes, got {class_names}")
    return ArrayData(train_images, train_labels, test_images, test_labels, class_names)


def load_npz(
    path: PathLike, input_hw: InputHW, *, val_fraction: float = 0.2, seed: int = 0
) -> DataSplits:
    """Load a ``.npz`` image archive as train/validation(/test) splits fitted to ``input_hw``.

    The validation split is drawn from the training images (see
    :func:`cnnkit.data.splits.stratified_split`); ``digest`` is the sha256 of the file.
    """
    input_hw, val_fraction, seed = check_split_options(input_hw, val_fraction, seed)
    path = Path(path).resolve()
    data = read_npz(path)
    train_full, test = data.to_image_sets(input_hw)
    return DataSplits.drawn(
        train_full, test, val_fraction, seed, source=str(path), digest=file_digest(path), kind="npz"
    )


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]  # (N, h, w)
    if images.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    if min(images.shape) == 0:
        raise ValueError(f"{name} must not be empty, got shape {images.shape}")
    return unit_pixels(images, name)


def _check_labels(labels: np.ndarray, count: int, name: str) -> np.ndarray:
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), one label per image, got {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if len(labels) != count:
        raise ValueError(
            f"{name} has {len(labels)} labels but there are {count} images; "
            "they must match one to one"
        )
    negative = int(np.count_nonzero(labels < 0))
    if negative:
        raise ValueError(f"{name} holds {negative} negative label(s), e.g. {labels.min()}")
    return labels.astype(np.int64)


def _check_class_names(names: np.ndarray, name: str) -> list[str]:
    if names.dtype.kind != "U" or names.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of strings (e.g. dtype <U10), "
            f"got dtype {names.dtype} and shape {names.shape}"
        )
    result = [str(n) for n in names]
    if any(not n for n in result) or len(set(result)) != len(result):
        raise ValueError(f"{name} must be distinct non-empty strings, got {result}")
    return result


def _image_set(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], input_hw: tuple[int, int]
) -> ImageSet:
    batch = torch.from_numpy(images)[:, None]  # (N, 1, h, w)
    return ImageSet(fit_to_size(batch, input_hw), torch.from_numpy(labels), list(class_names))
