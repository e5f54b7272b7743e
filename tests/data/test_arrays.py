import hashlib

import numpy as np
import pytest
import torch

from cnnkit.data import load, load_npz


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


def images_labels(n=12, classes=3, hw=(6, 5)):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, *hw), dtype=np.uint8), np.arange(n) % classes


def test_simple_layout(tmp_path):
    images, labels = images_labels()
    path = save(tmp_path / "a.npz", images=images, labels=labels)
    splits = load(path, (6, 5), val_fraction=0.25, seed=2)
    assert splits.kind == "npz" and splits.test is None
    assert splits.class_names == ["0", "1", "2"]
    assert splits.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.bincount(splits.val.labels).tolist() == [1, 1, 1]
    # same size: the pixels are the stored ones divided by 255, pairs kept
    for image, label in zip(splits.train.images, splits.train.labels, strict=True):
        index = np.flatnonzero((images == np.round(image[0].numpy() * 255)).all(axis=(1, 2)))
        assert labels[index[0]] == label


def test_train_test_layout_with_names_and_channel_axis(tmp_path):
    images, labels = images_labels()
    floats = images[:, None].astype(np.float64) / 255  # (N, 1, h, w) floats in [0, 1]
    names = np.array(["cat", "dog", "emu"])
    path = save(
        tmp_path / "b.npz",
        train_images=floats,
        train_labels=labels,
        test_images=floats[:4],
        test_labels=labels[:4],
        class_names=names,
    )
    splits = load_npz(path, (12, 10))
    assert splits.class_names == ["cat", "dog", "emu"]
    assert splits.test.images.shape == (4, 1, 12, 10)
    assert splits.test.labels.tolist() == labels[:4].tolist()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.arange(11) % 3}, r"labels has 11 labels but there are 12 images"),
        ({"images": np.full((12, 6, 5), np.nan)}, r"images holds 360 NaN or infinite value"),
        ({"images": np.full((12, 6, 5), np.inf)}, r"NaN or infinite"),
        ({"images": np.full((12, 6, 5), 1.5)}, r"outside \[0, 1\]"),
        ({"labels": np.arange(12) % 3 + 0.0}, r"labels must hold integer class indices"),
        ({"labels": np.arange(12) % 3 - 1}, r"labels holds 4 negative label"),
        ({"labels": (np.arange(12) % 3)[:, None]}, r"labels must have shape \(N,\)"),
        ({"images": np.zeros((12, 30), np.uint8)}, r"images must have shape \(N, H, W\)"),
        ({"images": np.zeros((12, 2, 6, 5), np.uint8)}, r"images must have shape \(N, H, W\)"),
        ({"images": np.zeros((12, 6, 5), bool)}, r"images must hold uint8 gray levels"),
        ({"labels": np.zeros(12, int)}, r"at least 2 classes"),
        ({"labels": np.arange(12) * 2}, r"labels go up to 22 with only 12 training images"),
        ({"labels": np.arange(12) % 3 * 2}, r"at least 2 images.*'1' \(0\)"),
        ({"class_names": np.array(["a", "b"])}, r"labels go up to 2 but class_names names only"),
        ({"class_names": np.array([1, 2, 3])}, r"class_names must be a 1-D array of strings"),
        ({"class_names": np.array(["a", "a", "b"])}, r"distinct non-empty strings"),
    ],
)
def test_refused(tmp_path, arrays, message):
    images, labels = images_labels()
    path = save(tmp_path / "bad.npz", **{"images": images, "labels": labels, **arrays})
    with pytest.raises(ValueError, match=message):
        load(path, 6)


def test_missing_keys_and_mixed_layouts(tmp_path):
    images, labels = images_labels()
    with pytest.raises(
        ValueError, match=r"must hold the arrays 'images' and 'labels'.*\['pixels'\]"
    ):
        load(save(tmp_path / "a.npz", pixels=images), 6)
    with pytest.raises(ValueError, match="both 'images' and 'train_images'"):
        load(save(tmp_path / "b.npz", images=images, labels=labels, train_images=images), 6)
    with pytest.raises(ValueError, match="both 'test_images' and 'test_labels' or neither"):
        load(
            save(tmp_path / "c.npz", train_images=images, train_labels=labels, test_images=images),
            6,
        )
    with pytest.raises(ValueError, match="test_images must have the size of train_images"):
        load(
            save(
                tmp_path / "d.npz",
                train_images=images,
                train_labels=labels,
                test_images=images[:, :3],
                test_labels=labels,
            ),
            6,
        )


def test_object_arrays_are_never_unpickled(tmp_path):
    images, _ = images_labels()
    labels = np.array([{"label": i % 3} for i in range(12)], dtype=object)
    path = save(tmp_path / "objects.npz", images=images, labels=labels)
    with pytest.raises(
        ValueError, match="array 'labels' holds Python objects, which are never unpickled"
    ):
        load(path, 6)


def test_not_an_archive(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"text.npz is not a .npz archive \(not a zip file\)"):
        load(tmp_path / "text.npz", 6)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="holds a single .npy array"):
        load(tmp_path / "single.npz", 6)
