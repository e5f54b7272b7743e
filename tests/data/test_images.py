import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.images import (
    InputTransform,
    decode_image,
    fit_to_size,
    fitted_size,
    load_image,
    prepare_image,
    to_gray,
    unit_pixels,
)


def luma(r, g, b):
    return (r * 299 + g * 587 + b * 114) / 1000 / 255


# ----------------------------------------------------------------------------- gray levels


def test_rgb_uses_luma():
    image = Image.new("RGB", (3, 2), (200, 100, 50))
    gray = to_gray(image)
    assert gray.shape == (2, 3) and gray.dtype == np.float32
    np.testing.assert_allclose(gray, luma(200, 100, 50), atol=1 / 255)


def test_rgba_composites_over_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    np.testing.assert_allclose(to_gray(image), [[1.0, 0.0]])
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    np.testing.assert_allclose(to_gray(half), [[127 / 255]], atol=1.5 / 255)


def test_la_composites_over_white():
    image = Image.new("LA", (1, 1), (0, 0))
    np.testing.assert_allclose(to_gray(image), [[1.0]])


def test_sixteen_bit_scaled_by_65535():
    values = np.array([[0, 65535, 32768]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    np.testing.assert_allclose(to_gray(image), values / 65535, rtol=1e-6)


def test_sixteen_bit_png_round_trip(tmp_path):
    values = np.array([[0, 10000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    gray = to_gray(load_image(tmp_path / "x.png"))
    np.testing.assert_allclose(gray, values / 65535, rtol=1e-6)


def test_int32_mode_read_as_sixteen_bit_and_clipped():
    image = Image.fromarray(np.array([[0, 65535, 100000]], dtype=np.int32), mode="I")
    np.testing.assert_allclose(to_gray(image), [[0.0, 1.0, 1.0]])


def test_palette_maps_through_palette():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 0, 0, 0])
    image.putpixel((1, 0), 1)
    np.testing.assert_allclose(to_gray(image), [[1.0, 0.0]])


def test_palette_transparency_is_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 0])
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_allclose(to_gray(load_image(tmp_path / "p.png")), [[1.0, 0.0]])


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "YCbCr", "F", "I;16B"])
def test_other_modes_give_unit_gray(mode):
    gray = to_gray(Image.new(mode, (4, 3)))
    assert gray.shape == (3, 4) and gray.dtype == np.float32
    assert gray.min() >= 0 and gray.max() <= 1


def test_float_mode_nan_refused():
    image = Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32), mode="F")
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_gray(image)


def test_unconvertible_mode_refused():
    with pytest.raises(ValueError, match="image mode 'LAB' has no gray conversion"):
        to_gray(Image.new("LAB", (2, 2)))


# ------------------------------------------------------------------------- the fit rule


def test_fitted_size():
    assert fitted_size((28, 28), (83, 83)) == (83, 83)
    assert fitted_size((100, 50), (10, 10)) == (10, 5)
    assert fitted_size((3, 7), (83, 83)) == (36, 83)  # 3 * 83 / 7 = 35.57
    assert fitted_size((1, 1000), (8, 8)) == (1, 8)  # never below 1 pixel


def test_fit_pads_with_edge_mean_by_hand():
    # A 2x4 image already fits a 4x4 frame: no scaling; rows 0 and 3 are padding, and every
    # pixel of a 2-row image is on its edge, so the padding is the mean of all 8.
    image = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]) / 8
    out = fit_to_size(image[None, None], (4, 4))[0, 0]
    expected = torch.full((4, 4), 4.5 / 8)
    expected[1:3] = image
    torch.testing.assert_close(out, expected)


def test_fit_scales_then_pads_by_hand():
    # [[0, 1]] (1x2) into 4x4: s = min(4/1, 4/2) = 2 -> 2x4 bilinear, align_corners=False:
    # columns 0, 1/4, 3/4, 1; centred in rows 1..2; padding = edge mean = 1/2.
    out = fit_to_size(torch.tensor([[[[0.0, 1.0]]]]), (4, 4))[0, 0]
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = torch.stack([torch.full((4,), 0.5), row, row, torch.full((4,), 0.5)])
    torch.testing.assert_close(out, expected)


def test_fit_odd_band_extra_pixel_right():
    # A 6x3 image in a 6x4 frame: s = min(6/6, 4/3) = 1, no scaling; the one column left
    # over goes to the right and holds the mean of the image's edge pixels.
    image = torch.zeros(1, 1, 6, 3)
    image[..., 0] = 1.0
    out = fit_to_size(image, (6, 4))[0, 0]
    torch.testing.assert_close(out[:, :3], image[0, 0])
    edge = torch.cat([image[0, 0, 0], image[0, 0, -1], image[0, 0, 1:-1, 0], image[0, 0, 1:-1, -1]])
    torch.testing.assert_close(out[:, 3], torch.full((6,), float(edge.mean())))


def test_fit_shrink_is_antialiased_mean():
    # Halving with an antialiased bilinear (triangle) filter of a 2x2-periodic checkerboard
    # gives its mean everywhere away from the border.
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    out = fit_to_size(board.float()[None, None], (4, 4))
    torch.testing.assert_close(out[0, 0, 1:3, 1:3], torch.full((2, 2), 0.5))


def test_fit_same_size_is_identity_and_keeps_channels():
    batch = torch.rand(3, 2, 5, 7)
    assert fit_to_size(batch, (5, 7)) is batch
    assert fit_to_size(batch, (10, 10)).shape == (3, 2, 10, 10)


def test_fit_per_image_padding():
    batch = torch.stack([torch.zeros(1, 2, 4), torch.ones(1, 2, 4)])  # (2, 1, 2, 4)
    out = fit_to_size(batch, (4, 4))
    assert out[0, 0, 0].eq(0).all() and out[1, 0, 0].eq(1).all()


def test_fit_errors():
    with pytest.raises(ValueError, match=r"shape \(N, C, h, w\)"):
        fit_to_size(torch.zeros(2, 3), (4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        fit_to_size(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="input_hw must be a positive integer, got 0"):
        fit_to_size(torch.zeros(1, 1, 2, 2), (0, 4))


# ---------------------------------------------------------------------- prepare / load


def test_prepare_image_from_pil_array_tensor_agree():
    pixels = np.random.default_rng(0).integers(0, 256, size=(10, 20), dtype=np.uint8)
    from_pil = prepare_image(Image.fromarray(pixels), (16, 16))
    from_array = prepare_image(pixels, (16, 16))
    from_tensor = prepare_image(torch.from_numpy(pixels / 255).float()[None], (16, 16))
    assert from_pil.shape == (1, 16, 16) and from_pil.dtype == torch.float32
    torch.testing.assert_close(from_pil, from_array)
    torch.testing.assert_close(from_tensor, from_array)


def test_prepare_image_rejects_bad_arrays():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        prepare_image(np.full((4, 4), 2.0), 8)
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_image(np.array([[np.inf, 0.0]]), 8)
    with pytest.raises(ValueError, match=r"shape \(h, w\) or \(1, h, w\)"):
        prepare_image(np.zeros((3, 4, 4)), 8)
    with pytest.raises(TypeError, match="got str"):
        prepare_image("x.png", 8)


def test_unit_pixels_integer_range():
    np.testing.assert_allclose(unit_pixels(np.array([0, 255], dtype=np.int64), "x"), [0, 1])
    with pytest.raises(ValueError, match="x has integer pixel values outside 0..255"):
        unit_pixels(np.array([0, 256]), "x")
    with pytest.raises(ValueError, match="x must hold uint8 gray levels"):
        unit_pixels(np.array([True]), "x")


def test_input_transform_is_prepare_image_and_round_trips():
    transform = InputTransform((12, 9))
    image = Image.new("RGB", (5, 7), (10, 20, 30))
    torch.testing.assert_close(transform(image), prepare_image(image, (12, 9)))
    assert InputTransform.from_dict(transform.to_dict()) == transform
    with pytest.raises(ValueError, match="input transform rule must be"):
        InputTransform.from_dict({"input_hw": [3, 3], "rule": "other"})


@pytest.mark.parametrize("suffix", ["png", "jpeg", "bmp", "gif", "tiff", "webp"])
def test_load_image_formats(tmp_path, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.new("RGB", (6, 4), (255, 255, 255)).save(path)
    image = load_image(path)
    assert image.size == (6, 4)
    np.testing.assert_allclose(prepare_image(image, 4).numpy(), 1.0, atol=2 / 255)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a readable image: not a recognised"):
        load_image(tmp_path / "notes.txt")
    buffer = tmp_path / "cut.png"
    Image.new("L", (64, 64), 3).save(buffer)
    buffer.write_bytes(buffer.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png is not a readable image"):
        load_image(buffer)


def test_decode_first_frame_of_animation(tmp_path):
    frames = [Image.new("L", (3, 3), v) for v in (0, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    image = decode_image((tmp_path / "a.gif").read_bytes())
    np.testing.assert_allclose(to_gray(image), 0.0)
