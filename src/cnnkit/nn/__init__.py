"""Modules that hold parameters or buffers and call one op from :mod:`cnnkit.ops`."""

from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.nn.classifier import Classifier
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample
from cnnkit.nn.tying import LocallyConnected2d

__all__ = [
    "Classifier",
    "ContrastNorm",
    "DivisiveNorm",
    "FilterBank",
    "LocallyConnected2d",
    "Pool",
    "PoolSubsample",
    "ReLU",
    "Rectify",
    "Subsample",
    "SubtractiveNorm",
]
