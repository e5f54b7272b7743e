"""Stateless tensor functions: one concept per file, no parameters held."""

from cnnkit.ops.activation import rectify, relu
from cnnkit.ops.convolution import convolve, correlate
from cnnkit.ops.normalization import (
    contrast_norm,
    divisive_norm,
    gaussian_window,
    rectified_contrast_norm,
    subtractive_norm,
)
from cnnkit.ops.pooling import pool2d, pool_subsample2d, subsample2d
from cnnkit.ops.table_conv import table_conv2d

__all__ = [
    "contrast_norm",
    "convolve",
    "correlate",
    "divisive_norm",
    "gaussian_window",
    "pool2d",
    "pool_subsample2d",
    "rectified_contrast_norm",
    "rectify",
    "relu",
    "subsample2d",
    "subtractive_norm",
    "table_conv2d",
]
