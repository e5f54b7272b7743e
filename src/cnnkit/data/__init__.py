"""Datasets and the transform to the network's input: bundled digits, image folders, arrays."""

from cnnkit.data.arrays import load_npz
from cnnkit.data.digits import DIGITS_PATH, load_digits
from cnnkit.data.folder import UnreadableFilesWarning, load_folder
from cnnkit.data.images import (
    InputTransform,
    fit_to_size,
    load_image,
    prepare_image,
    to_gray,
)
from cnnkit.data.sources import load
from cnnkit.data.splits import DataSplits, ImageSet, stratified_split

__all__ = [
    "DIGITS_PATH",
    "DataSplits",
    "ImageSet",
    "InputTransform",
    "UnreadableFilesWarning",
    "fit_to_size",
    "load",
    "load_digits",
    "load_folder",
    "load_image",
    "load_npz",
    "prepare_image",
    "stratified_split",
    "to_gray",
]
