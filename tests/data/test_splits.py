import numpy as np
import pytest
import torch

from cnnkit.data.splits import DataSplits, ImageSet, split_train_val, stratified_split


def make_set(labels, names=("a", "b", "c"), hw=(4, 4)):
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return ImageSet(torch.rand(len(labels), 1, *hw), labels, list(names))


def test_counts_per_class_with_rounding_and_clipping():
    # class 0: 10 -> round(2.5) = 3 (half up); class 1: 2 -> round(0.5)=1; class 2: 4 -> 1
    labels = np.array([0] * 10 + [1] * 2 + [2] * 4)
    train, val = stratified_split(labels, 0.25, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [3, 1, 1]
    assert np.bincount(labels[train], minlength=3).tolist() == [7, 1, 3]
    # a large fraction still leaves one training image per class
    train, val = stratified_split(labels, 0.99, seed=0)
    assert np.bincount(labels[train], minlength=3).tolist() == [1, 1, 1]


def test_split_is_disjoint_sorted_complete_and_seeded():
    labels = np.repeat(np.arange(5), 20)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(val, np.sort(val))
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], val)


def test_split_depends_only_on_labels_not_order_of_other_classes():
    labels = np.array([0, 1] * 10)
    _, val = stratified_split(labels, 0.3, seed=0)
    assert np.bincount(labels[val]).tolist() == [3, 3]


def test_split_errors():
    with pytest.raises(ValueError, match=r"at least 2 images.*'b' \(1\), 'c' \(0\)"):
        stratified_split(np.array([0, 0, 1]), 0.5, 0, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 1\), got 1"):
        stratified_split(np.array([0, 0, 1, 1]), 1, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        stratified_split(np.array([0, 0, 1, 1]), 0.5, -1)
    with pytest.raises(ValueError, match="non-negative class indices"):
        stratified_split(np.array([0, 0, -1, -1]), 0.5, 0)
    with pytest.raises(ValueError, match="below the 2 class names, got label 2"):
        stratified_split(np.array([0, 0, 2, 2]), 0.5, 0, class_names=["a", "b"])


def test_split_train_val_keeps_pairs():
    full = make_set([0, 1, 2] * 4)
    train, val = split_train_val(full, 0.5, seed=1)
    assert len(train) + len(val) == 12
    for part in (train, val):
        # each image still carries its own label: find it in the full set
        for image, label in zip(part.images, part.labels, strict=True):
            match = (full.images == image).flatten(1).all(1).nonzero()
            assert full.labels[match.item()] == label


def test_image_set_checks():
    with pytest.raises(
        TypeError, match="images must be a float32 torch.Tensor, got a torch.float64"
    ):
        ImageSet(
            torch.zeros(2, 1, 3, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), ["a"]
        )
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ImageSet(torch.zeros(2, 1, 3, 3), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        ImageSet(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]), ["a"])
    with pytest.raises(TypeError, match="labels must be an int64"):
        ImageSet(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1], dtype=torch.int32), ["a", "b"])


def test_data_splits_checks_and_config():
    train, val = make_set([0, 1, 2]), make_set([2, 1])
    splits = DataSplits(train, val, None, source="x", digest="0" * 64)
    assert splits.num_classes == 3 and splits.input_hw == (4, 4)
    config = splits.to_config()
    assert config["sizes"] == {"train": 3, "val": 2, "test": None}
    assert config["kind"] == "custom"
    with pytest.raises(ValueError, match="val.class_names must equal train.class_names"):
        DataSplits(train, make_set([0], names=("x", "y", "z")), None, source="x", digest="")
    with pytest.raises(ValueError, match="test images must have shape"):
        DataSplits(train, val, make_set([0], hw=(5, 5)), source="x", digest="")
