import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import UnreadableFilesWarning, load, load_folder


def write_class(root, name, count, size=(12, 8), value=0, mode="L"):
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new(mode, size, value).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "categories"
    write_class(root, "zebra", 5, value=200)
    write_class(root, "apple", 6, value=10)
    return root


def test_loads_sorted_classes_and_stratified_split(tree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load(tree, (6, 6), val_fraction=0.4, seed=1)
    assert splits.class_names == ["apple", "zebra"]
    assert splits.kind == "folder" and splits.test is None
    assert splits.source == str(tree.resolve())
    assert len(splits.train) + len(splits.val) == 11
    assert torch.bincount(splits.val.labels).tolist() == [2, 2]  # round(2.4), round(2.0)
    assert splits.train.images.shape[1:] == (1, 6, 6)
    # apples are dark (10/255), zebras bright (200/255): labels follow the class folders
    for part in (splits.train, splits.val):
        means = part.images.mean(dim=(1, 2, 3))
        torch.testing.assert_close(means, torch.where(part.labels == 0, 10 / 255, 200 / 255))


def test_digest_deterministic_and_content_sensitive(tree):
    first = load_folder(tree, 4).digest
    assert load_folder(tree, 8, seed=5).digest == first  # size and split do not enter it
    Image.new("L", (12, 8), 11).save(tree / "apple" / "img_00.png")
    assert load_folder(tree, 4).digest != first


def test_unreadable_files_skipped_with_one_warning(tree):
    (tree / "apple" / "notes.txt").write_text("not an image")
    png = tree / "zebra" / "img_00.png"
    (tree / "zebra" / "broken.png").write_bytes(png.read_bytes()[:50])
    (tree / "zebra" / ".hidden.png").write_text("hidden: never tried")
    (tree / ".cache").mkdir()
    (tree / "README.txt").write_text("top-level files are ignored")
    with pytest.warns(UnreadableFilesWarning) as record:
        splits = load(tree, 8)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("skipped 2 file(s)")
    assert f"{tree / 'apple' / 'notes.txt'}: not a recognised image format" in message
    assert f"{tree / 'zebra' / 'broken.png'}: cannot be decoded" in message
    assert "hidden" not in message and "README" not in message
    assert len(splits.train) + len(splits.val) == 11
    assert splits.class_names == ["apple", "zebra"]


def test_empty_class_is_an_error(tree):
    (tree / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"every class folder needs readable images; empty: 'empty' \(no files\)"
    ):
        load(tree, 8)


def test_class_of_unreadable_files_is_an_error_after_the_warning(tree):
    (tree / "junk").mkdir()
    (tree / "junk" / "a.txt").write_text("x")
    with pytest.warns(UnreadableFilesWarning, match="a.txt"):
        with pytest.raises(ValueError, match=r"'junk' \(1 files, none readable\)"):
            load(tree, 8)


def test_one_class_empty_folder_missing_path(tmp_path):
    write_class(tmp_path / "one", "only", 3)
    with pytest.raises(ValueError, match=r"one.* has only one class sub-folder \('only'\)"):
        load(tmp_path / "one", 8)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"none has no class sub-folders"):
        load(tmp_path / "none", 8)
    with pytest.raises(FileNotFoundError, match=r"'.*missing' does not exist; expected 'digits'"):
        load(tmp_path / "missing", 8)
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        load_folder(tmp_path / "missing", 8)


def test_class_with_one_image_cannot_be_split(tree):
    write_class(tree, "single", 1)
    with pytest.raises(ValueError, match=r"at least 2 images.*'single' \(1\)"):
        load(tree, 8)


def test_mixed_modes_and_aspect_ratios(tmp_path):
    root = tmp_path / "mixed"
    write_class(root, "a", 2, size=(30, 10), mode="RGB", value=(255, 255, 255))
    folder = write_class(root, "b", 1, size=(5, 5), mode="RGBA", value=(0, 0, 0, 255))
    Image.fromarray(np.zeros((7, 3), dtype=np.uint16)).save(folder / "sixteen.png")
    palette = Image.new("P", (4, 9))
    palette.putpalette([0, 0, 0])
    palette.save(folder / "palette.gif")
    splits = load(root, (10, 10), val_fraction=0.5)
    images = torch.cat([splits.train.images, splits.val.images])
    labels = torch.cat([splits.train.labels, splits.val.labels])
    assert images.shape == (5, 1, 10, 10)
    # white images stay white after padding with their edge mean; black ones stay black
    torch.testing.assert_close(images[labels == 0], torch.ones(2, 1, 10, 10))
    torch.testing.assert_close(images[labels == 1], torch.zeros(3, 1, 10, 10))


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match="is not a folder or a .npz file"):
        load(path, 8)
    with pytest.raises(TypeError, match="data source must be a str or a path, got int"):
        load(3, 8)
