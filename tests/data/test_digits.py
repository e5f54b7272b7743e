import hashlib
import json

import numpy as np
import pytest
import torch

from cnnkit.data import DIGITS_PATH, load, load_digits, prepare_image


@pytest.fixture(scope="module")
def digits():
    return load("digits", (28, 28))


def test_bundled_archive_layout():
    with np.load(DIGITS_PATH, allow_pickle=False) as archive:
        assert archive["train_images"].shape == (4000, 28, 28)
        assert archive["train_images"].dtype == np.uint8
        assert archive["test_images"].shape == (1000, 28, 28)
        assert archive["train_labels"].shape == (4000,)
        assert np.bincount(archive["train_labels"]).tolist() == [400] * 10
        assert np.bincount(archive["test_labels"]).tolist() == [100] * 10
        assert archive["class_names"].tolist() == [str(d) for d in range(10)]
        assert "source_sha256=846f6cad" in str(archive["provenance"])
        # MNIST digits are bright strokes on a dark, empty border
        assert archive["train_images"].max() == 255
        assert archive["train_images"][:, 0, :].max() < 64


def test_shapes_dtypes_and_balance(digits):
    assert len(digits.train) == 3200 and len(digits.val) == 800 and len(digits.test) == 1000
    for part in (digits.train, digits.val, digits.test):
        assert part.images.dtype == torch.float32 and part.images.shape[1:] == (1, 28, 28)
        assert part.labels.dtype == torch.int64
        assert 0 <= part.images.min() and part.images.max() <= 1
    assert torch.bincount(digits.train.labels).tolist() == [320] * 10
    assert torch.bincount(digits.val.labels).tolist() == [80] * 10
    assert torch.bincount(digits.test.labels).tolist() == [100] * 10
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.source == "digits" and digits.kind == "digits"
    assert digits.digest == hashlib.sha256(DIGITS_PATH.read_bytes()).hexdigest()
    json.dumps(digits.to_config())


def _rows(images):
    return {bytes(row) for row in (images * 255).round().to(torch.uint8).flatten(1).numpy()}


def test_split_disjoint_deterministic_and_test_fixed(digits):
    train, val = _rows(digits.train.images), _rows(digits.val.images)
    assert not train & val  # (a few MNIST images could repeat; this subset has none)
    again = load_digits(28, seed=0)
    assert torch.equal(again.val.images, digits.val.images)
    other = load_digits(28, val_fraction=0.1, seed=7)
    assert len(other.val) == 400
    assert not torch.equal(other.val.images[:400], digits.val.images[:400])
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.test.labels, digits.test.labels)
    assert not _rows(digits.test.images) & (train | val)


def test_upscaled_to_83_matches_prepare_image():
    big = load_digits((83, 83))
    assert big.train.images.shape == (3200, 1, 83, 83)
    with np.load(DIGITS_PATH, allow_pickle=False) as archive:
        raw = archive["test_images"][0]
    torch.testing.assert_close(big.test.images[0], prepare_image(raw, (83, 83)))


def test_loaded_sets_do_not_alias_the_cache():
    first = load_digits(28)
    first.test.images.zero_()
    first.train.images.zero_()
    second = load_digits(28)
    assert second.test.images.max() == 1 and second.train.images.max() == 1
