"""From an image file or array to a network input: gray pixels in [0, 1], fitted to ``(H, W)``.

Every path into the network goes through :func:`prepare_image` (one image) or
:func:`fit_to_size` (a batch), so training, evaluation and prediction see images prepared
the same way. The rules:

Gray levels
    Pixel values become ``float32`` in [0, 1] with 0 the darkest and 1 the brightest (the
    lecture's 0..255 gray levels divided by 255). Colour images use the ITU-R 601-2 luma
    ``L = 0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``). Transparent pixels
    (RGBA, LA, PA, or a palette/colour key marked transparent) are composited over white,
    the page a viewer shows behind them. 16-bit images (``I;16`` and variants) and 32-bit
    integer images (``I``) are read as 16-bit, ``value / 65535``; 32-bit float images
    (``F``) as 0..255 like Pillow does; both clipped to [0, 1]. A multi-frame file gives
    its first frame.

Size
    An ``h x w`` image is scaled by ``s = min(H / h, W / w)`` — its longer side, relative to
    the target, fits exactly — to ``round(h s) x round(w s)`` with bilinear interpolation
    (``align_corners=False``; antialiased when shrinking), then centred in the ``H x W``
    frame. When the aspect ratios differ, the band left over is filled with the mean of the
    pixels on the edge of the scaled image, so the padding continues the image's own
    background (black for digits, white for a photo on a white page) instead of drawing a
    frame. When the band has an odd number of pixels, the extra one goes below or to the
    right. A 28x28 digit fitted to 83x83 is thus a plain bilinear upscale, with no padding.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from cnnkit._validation import check_floating, pair

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def decode_image(data: bytes) -> Image.Image:
    """Decode the bytes of an image file (first frame) into a loaded Pillow image.

    Raises ``ValueError`` with the reason when the bytes are not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    # A damaged file can make a decoder raise almost anything (OSError, SyntaxError, struct
    # errors, DecompressionBombError ...); every one of them means "cannot be decoded".
    except Exception as error:
        raise ValueError(f"cannot be decoded ({type(error).__name__}: {error})") from None
    return image


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file of any format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP ...).

    Returns the first frame, fully loaded (the file is closed). Raises
    ``FileNotFoundError`` for a missing path and ``ValueError`` naming the path and the
    reason for a folder or a file that is not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    try:
        return decode_image(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} is not a readable image: {error}") from None


def to_gray(image: Image.Image) -> np.ndarray:
    """Gray levels of a Pillow image of any mode, shape ``(h, w)``, float32 in [0, 1].

    See the module docstring for the rule of each mode. Raises ``ValueError`` for a mode
    that has no gray conversion.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.float32) / 65535.0
    elif mode == "F":
        gray = np.asarray(image).astype(np.float32) / 255.0
        if not np.isfinite(gray).all():
            raise ValueError("float image holds NaN or infinite pixels")
    else:
        try:
            if mode in _ALPHA_MODES or "transparency" in image.info:
                rgba = image.convert("RGBA")
                page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(page, rgba)
            gray = np.asarray(image.convert("L")).astype(np.float32) / 255.0
        except ValueError as error:  # Pillow: "conversion from LAB to RGB not supported"
            raise ValueError(f"image mode {mode!r} has no gray conversion ({error})") from None
    return np.clip(gray, 0.0, 1.0)


def unit_pixels(array: np.ndarray, name: str) -> np.ndarray:
    """Check an array of pixel values and return it as float32 in [0, 1].

    ``uint8`` (and any other integer dtype holding values in 0..255) is divided by 255;
    floating point must already be finite and in [0, 1]. Anything else raises a
    ``ValueError`` that starts with ``name``.
    """
    kind = array.dtype.kind
    if kind in "ui":
        if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{name} has integer pixel values outside 0..255 "
                f"(min {array.min()}, max {array.max()}); store uint8 gray levels, "
                "or floats in [0, 1]"
            )
        return array.astype(np.float32) / np.float32(255)
    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{name} holds {bad} NaN or infinite value(s); refused")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"{name} has floating-point pixel values outside [0, 1] "
                f"(min {array.min():g}, max {array.max():g}); divide 0..255 gray levels by 255"
            )
        return array.astype(np.float32)
    raise ValueError(
        f"{name} must hold uint8 gray levels or floats in [0, 1], got dtype {array.dtype}"
    )


def fitted_size(hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h', w')`` of an ``hw`` image scaled to fit ``input_hw`` with its aspect ratio.

    ``s = min(H / h, W / w)``, ``h' = round(h s)``, ``w' = round(w s)``, each at least 1
    and at most the target side.
    """
    (h, w), (H, W) = hw, input_hw
    scale = min(H / h, W / w)
    return (
        min(H, max(1, math.floor(h * scale + 0.5))),
        min(W, max(1, math.floor(w * scale + 0.5))),
    )


def fit_to_size(images: torch.Tensor, input_hw: tuple[int, int] | int) -> torch.Tensor:
    """Scale a batch to fit ``input_hw`` keeping the aspect ratio, centre it and pad.

    ``images`` is ``(N, C, h, w)`` floating point; the result is ``(N, C, H, W)`` with the
    same dtype. Scaling is bilinear (antialiased when shrinking) to
    :func:`fitted_size`; the padding of each image and channel is the mean of the pixels on
    the edge (first and last rows and columns) of its scaled version. A batch that already
    has size ``(H, W)`` is returned unchanged (the same tensor).
    """
    check_floating("images", images)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, h, w), got {tuple(images.shape)}")
    H, W = pair("input_hw", input_hw)
    h, w = images.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"images must have a non-empty (h, w), got {tuple(images.shape)}")
    new_h, new_w = fitted_size((h, w), (H, W))
    if (new_h, new_w) != (h, w):
        low, high = images.min(), images.max()
        shrink = new_h < h or new_w < w
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=shrink
        )
        # The weights are convex, so only rounding could step outside the input's range.
        images = torch.clamp(images, low, high)
    if (new_h, new_w) == (H, W):
        return images

    total = images.sum(dim=(-2, -1))  # (N, C)
    inner = images[..., 1:-1, 1:-1].sum(dim=(-2, -1))  # (N, C); empty when a side <= 2
    edge_count = new_h * new_w - max(new_h - 2, 0) * max(new_w - 2, 0)
    fill = (total - inner) / edge_count  # (N, C)
    out = fill[..., None, None].expand(*images.shape[:2], H, W).clone()  # (N, C, H, W)
    top, left = (H - new_h) // 2, (W - new_w) // 2
    out[..., top : top + new_h, left : left + new_w] = images
    return out


def prepare_image(image: Any, input_hw: tuple[int, int] | int) -> torch.Tensor:
    """One image as the network's input: ``(1, H, W)`` float32 gray levels in [0, 1].

    ``image`` is a Pillow image (any mode), or an array/tensor of gray levels of shape
    ``(h, w)`` or ``(1, h, w)`` — ``uint8`` 0..255, or floats already in [0, 1]. The gray
    conversion and the fit to ``input_hw`` follow the rules of this module's docstring.
    """
    input_hw = pair("input_hw", input_hw)
    if isinstance(image, Image.Image):
        gray = to_gray(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]  # (h, w)
        if array.ndim != 2 or array.size == 0:
            raise ValueError(f"image array must have shape (h, w) or (1, h, w), got {array.shape}")
        gray = unit_pixels(array, "image")
    else:
        raise TypeError(
            "image must be a PIL image, a NumPy array or a torch.Tensor, "
            f"got {type(image).__name__}"
        )
    batch = torch.from_numpy(np.ascontiguousarray(gray))[None, None]  # (1, 1, h, w)
    return fit_to_size(batch, input_hw)[0]  # (1, H, W)


@dataclass(frozen=True)
class InputTransform:
    """The transform from an image to the input of a network that expects ``input_hw``.

    Calling it is :func:`prepare_image`; :meth:`to_dict`/:meth:`from_dict` store it in a
    run's JSON so that prediction prepares images exactly as training did.
    """

    input_hw: tuple[int, int]

    RULE = "gray-unit/fit-bilinear/pad-edge-mean"
    """Names the rules of this module; stored so that a later change of them is detected."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_hw", pair("input_hw", self.input_hw))

    def __call__(self, image: Any) -> torch.Tensor:
        """``(1, H, W)`` float32 input for one image; see :func:`prepare_image`."""
        return prepare_image(image, self.input_hw)

    def to_dict(self) -> dict[str, Any]:
        return {"input_hw": list(self.input_hw), "rule": self.RULE}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputTransform:
        rule = data.get("rule")
        if rule != cls.RULE:
            raise ValueError(f"input transform rule must be {cls.RULE!r}, got {rule!r}")
        if "input_hw" not in data:
            raise ValueError(f"input transform needs 'input_hw', got keys {sorted(data)}")
        return cls(tuple(data["input_hw"]))
