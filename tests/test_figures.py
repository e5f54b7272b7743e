"""Figures: feature maps equal the network's activations, the Sobel comparison, curves, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit import figures
from cnnkit.cli import main
from cnnkit.data import load_image, prepare_image
from cnnkit.figures import SOBEL_GX
from cnnkit.models import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    PoolSpec,
    StageSpec,
)


@pytest.fixture(scope="module")
def digits_model():
    return figures.random_network("digits28", seed=0)


@pytest.fixture(scope="module")
def digit_image(tmp_path_factory):
    """A 20×30 RGB picture of a bright bar on a dark ground, saved as PNG."""
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[5:15, 12:17] = (250, 200, 100)
    path = tmp_path_factory.mktemp("images") / "bar.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits28 run of 2 epochs (one step each) on 16 random 28×28 images, 4 for test."""
    from cnnkit import data, training
    from cnnkit.models import from_name

    folder = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    source = folder / "noise.npz"
    np.savez(
        source,
        train_images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
        train_labels=np.arange(16) % 2,
        test_images=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        test_labels=np.arange(4) % 2,
    )
    splits = data.load(source, (28, 28), val_fraction=0.25, seed=0)
    config = training.TrainConfig(epochs=2, batch_size=16)
    return training.fit(from_name("digits28"), splits, config, out=folder / "run")


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        size = image.size
    with Image.open(path) as image:
        image.verify()  # raises on a damaged file
    return size


# --------------------------------------------------------------------------------------
# Mosaics
# --------------------------------------------------------------------------------------


def test_tile_layout_by_hand():
    maps = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    mosaic = figures.tile_maps(maps)
    # 5 maps of 3×4: ceil(sqrt(5 * 3 / 4)) = 2 columns, 3 rows, gap max(1, round(0.24)) = 1
    assert mosaic.shape == (3 * 3 + 2, 2 * 4 + 1)
    np.testing.assert_array_equal(mosaic.data[4:7, 5:9], maps[3])
    assert mosaic.mask.sum() == mosaic.size - maps.size
    assert mosaic.mask[3].all() and mosaic.mask[:, 4].all()
    np.testing.assert_array_equal(figures.untile(mosaic, 5, 3, 4), maps)


def test_tile_errors():
    with pytest.raises(ValueError, match=r"maps must have a non-empty shape \(C, H, W\), got"):
        figures.tile_maps(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="mosaic of 4 maps 2x2 must have shape"):
        figures.untile(np.zeros((3, 3)), 4, 2, 2)


# --------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------


def test_random_network_is_seeded_and_leaves_global_generator():
    state = torch.random.get_rng_state()
    a = figures.random_network("digits28", seed=3)
    b = figures.random_network("digits28", seed=3)
    c = figures.random_network("digits28", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.stage1.filters.weight, b.stage1.filters.weight)
    assert not torch.equal(a.stage1.filters.weight, c.stage1.filters.weight)
    assert not a.training


def test_feature_maps_equal_intermediates(digits_model, digit_image):
    steps = figures.feature_maps(digits_model, digit_image)
    x = prepare_image(load_image(digit_image), (28, 28))
    with torch.no_grad():
        expected = digits_model.intermediates(x[None])
    assert steps[0].layer == "input"
    np.testing.assert_array_equal(steps[0].values, x.numpy())
    shown = {s.layer: s.values for s in steps if s.layer not in (None, "input")}
    assert list(shown) == [name for name in expected if name != "classifier"]
    for name, values in shown.items():
        np.testing.assert_array_equal(values, expected[name][0].numpy(), err_msg=name)
    # The fused pooling layer shows as pooling at stride 1, then subsampling by 2.
    for i, step in enumerate(steps):
        if step.layer is None:
            assert step.step == "pool" and steps[i + 1].step == "subsample"
            np.testing.assert_array_equal(step.values[:, ::2, ::2], steps[i + 1].values)
    titles = [s.title for s in steps]
    assert titles[:6] == [
        "input · 1@28×28",
        "stage 1 · filters · 16@24×24",
        "stage 1 · rectify · 16@24×24",
        "stage 1 · norm · 16@24×24",
        "stage 1 · pool · 16@23×23",
        "stage 1 · subsample · 16@12×12",
    ]
    fused = figures.feature_maps(digits_model, digit_image, split_pooling=False)
    assert [s.step for s in fused if s.stage == 1][-1] == "pool + subsample"
    assert None not in [s.layer for s in fused]


def test_feature_maps_lecture_shapes():
    steps = figures.feature_maps(figures.random_network("lecun83"), np.zeros((83, 83), np.uint8))
    titles = [s.title for s in steps]
    for title in (
        "stage 1 · filters · 64@75×75",
        "stage 1 · pool · 64@66×66",
        "stage 1 · subsample · 64@14×14",
        "stage 2 · filters · 256@6×6",
        "stage 2 · subsample · 256@1×1",
    ):
        assert title in titles


@pytest.mark.parametrize("maps", [16, 3, 40])
def test_figure_arrays_are_the_activations(digits_model, digit_image, maps):
    fig = figures.feature_maps_figure(
        digits_model, digit_image, note="weights: seeded random", maps=maps
    )
    x = prepare_image(load_image(digit_image), (28, 28))
    with torch.no_grad():
        expected = digits_model.intermediates(x[None])
    checked = 0
    for ax in fig.axes:
        if ax.get_label() in expected:
            value = expected[ax.get_label()][0].numpy()[:maps]  # the first `maps` maps
            drawn = figures.untile(ax.images[0].get_array(), *value.shape)
            np.testing.assert_array_equal(drawn, value, err_msg=ax.get_label())
            checked += 1
    assert checked == len(expected) - 1  # every layer but the classifier
    texts = [t.get_text() for t in fig.texts]
    assert "stage 2 · filters · 32@8×8" in texts
    assert any("seeded random" in t and "bar.png" in t for t in texts)
    shown = {16: "first 16 of 32 maps", 3: "first 3 of 32 maps", 40: "all 32 maps"}[maps]
    assert any(t.startswith(shown) for t in texts)
    if maps == 16:
        # Panels of 3.1 in: the mosaic of 32@8×8 maps (each value 2×2, 16 px) is 4 × 16 + 3
        # gaps = 67 px, and 0.88 × 3.1 in × 100 dpi = 272.8 px shows each map 65 px (the
        # least multiple of 0.1 in at which every map is >= 64 px). 7 columns (input, 5
        # steps, pooling window) by 0.5 + 2 rows × (0.75 + 3.1 + 0.45) inches.
        assert tuple(fig.get_size_inches() * figures.DPI) == pytest.approx((2170, 910))


def test_one_stage_figure(digits_model, digit_image):
    fig = figures.feature_maps_figure(digits_model, digit_image, stage=2)
    labels = [ax.get_label() for ax in fig.axes if not ax.get_label().endswith("colour bar")]
    assert labels == [
        "stage1.pool",  # the maps entering stage 2
        "stage2.filters",
        "stage2.nonlin",
        "stage2.norm",
        "stage2.pool (stride 1)",
        "stage2.pool",
        "stage2.pooling window",  # the lecture's Figure 3 for this stage
    ]
    # 7 panels of 3.5 in by 0.5 + 0.75 + 3.5 + 0.45 inches.
    assert tuple(fig.get_size_inches() * figures.DPI) == pytest.approx((2450, 520))
    with pytest.raises(ValueError, match="stage must be between 1 and 2 .* got 3"):
        figures.feature_maps_figure(digits_model, digit_image, stage=3)


# --------------------------------------------------------------------------------------
# The show figure: map sizes, colour bars, separators, the pooling window
# --------------------------------------------------------------------------------------


def saved_map_sides(fig, path):
    """Each map panel's label -> the shorter side, in pixels of the PNG saved at ``path``,
    of one map drawn in it (read from the panel's extent and its mosaic's mask)."""
    fig.savefig(path)  # lays the figure out as saved: equal-aspect axes shrink to the image
    assert png_size(path) == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
    sides = {}
    for ax in fig.axes:
        if ax.get_label().endswith(" · colour bar"):
            continue
        mosaic = ax.images[0].get_array()
        mask = np.ma.getmaskarray(mosaic)
        # The first tile ends where the first masked (gap) pixel of its row/column starts.
        tile_h = int(mask[:, 0].argmax()) if mask[:, 0].any() else mask.shape[0]
        tile_w = int(mask[0].argmax()) if mask[0].any() else mask.shape[1]
        box = ax.get_window_extent()
        px_per_cell = min(box.width / mosaic.shape[1], box.height / mosaic.shape[0])
        sides[ax.get_label()] = px_per_cell * min(tile_h, tile_w)
    return sides


@pytest.mark.parametrize(
    ("preset", "stage", "maps"),
    [("lecun83", None, 16), ("digits28", None, 16), ("digits28", 2, 16),
     ("lecun83", None, 64), ("lenet5", None, 1)],
)  # fmt: skip
def test_every_drawn_map_is_at_least_60_px(preset, stage, maps, tmp_path):
    model = figures.random_network(preset)
    image = np.zeros((40, 40), np.uint8)
    image[8:32, 15:25] = 255
    fig = figures.feature_maps_figure(model, image, stage=stage, maps=maps)
    sides = saved_map_sides(fig, tmp_path / "maps.png")
    steps = figures.feature_maps(model, image)
    in_row = [s for s in steps if stage is None or s.stage == stage]
    assert len(sides) >= len(in_row)  # every step's panel was measured (and the extras)
    small = {label: round(side, 1) for label, side in sides.items() if side < 60}
    assert not small, f"maps under 60 px: {small}"


def test_lecture_maps_at_the_default_layout_are_64_px(tmp_path):
    # lecun83, 16 of 64 maps 75×75: 4 × 75 + 3 gaps of round(0.06 × 75) = 4 is 312 px of
    # mosaic in an axes of 0.88 × 3.1 in × 100 dpi = 272.8 px: 75 × 272.8 / 312 = 65.6 px.
    fig = figures.feature_maps_figure(figures.random_network("lecun83"), np.zeros((83, 83)))
    sides = saved_map_sides(fig, tmp_path / "maps.png")
    assert sides["stage1.filters"] == pytest.approx(75 * 272.8 / 312, abs=0.05)
    # 14×14 maps, each value drawn 2×2: 4 × 28 + 3 gaps of round(0.06 × 28) = 2 is 118 px.
    assert sides["stage1.pool"] == pytest.approx(28 * 272.8 / 118, abs=0.05)
    # One map 83×83 fills its axes.
    assert sides["input"] == pytest.approx(272.8, abs=0.05)


def test_one_colour_bar_per_panel_with_the_panels_scale(digits_model, digit_image):
    fig = figures.feature_maps_figure(digits_model, digit_image)
    axes = {ax.get_label(): ax for ax in fig.axes}
    bars = [label for label in axes if label.endswith(" · colour bar")]
    panels = [label for label in axes if label not in bars]
    # input, 5 steps of stage 1, the pooling window, 5 steps of stage 2
    assert len(panels) == 12 and len(bars) == len(panels)
    steps = figures.feature_maps(digits_model, digit_image)
    counts = {s.layer or f"stage{s.stage}.pool (stride 1)": s.values.shape for s in steps}
    for label in panels:
        image = axes[label].images[0]
        bar = axes[f"{label} · colour bar"]
        shape = (1, *counts["stage1.norm"][1:]) if "window" in label else counts[label]
        drawn = figures.untile(image.get_array(), min(16, shape[0]), *shape[1:])
        low, high = float(drawn.min()), float(drawn.max())
        if label == "input":
            expected = (0.0, 1.0)
        elif low < 0:
            expected = (-max(-low, high), max(-low, high))
        else:
            expected = (0.0, high)
        assert image.get_clim() == pytest.approx(expected), label
        assert bar.get_xlim() == pytest.approx(expected), label
        ticks = [expected[0], 0.0, expected[1]] if expected[0] < 0 else list(expected)
        np.testing.assert_allclose(bar.get_xticks(), ticks, err_msg=label)
        names = [t.get_text() for t in bar.get_xticklabels()]
        assert names[-1] == f"{expected[1]:.3g}" and names[0] == f"{expected[0]:.3g}".replace(
            "-", "−"
        )


def test_separators_are_neutral(digits_model, digit_image, tmp_path):
    fig = figures.feature_maps_figure(digits_model, digit_image)
    fig.savefig(tmp_path / "maps.png")
    with Image.open(tmp_path / "maps.png") as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    checked = {"signed": 0, "gray": 0}
    for ax in fig.axes:
        mosaic = ax.images[0].get_array() if ax.images else None
        if mosaic is None or not np.ma.getmaskarray(mosaic).any():
            continue  # colour bars, and panels of one map, have no gaps
        mask = np.ma.getmaskarray(mosaic)
        tile_h, tile_w = int(mask[:, 0].argmax()), int(mask[0].argmax())
        gap = int((~mask[0, tile_w:]).argmax())
        box = ax.get_window_extent()
        cell = box.width / mosaic.shape[1]
        # The middle of the gap right of the first tile, halfway down it (PNG rows from the top).
        x = int(box.x0 + (tile_w + gap / 2) * cell)
        y = int(pixels.shape[0] - (box.y1 - tile_h / 2 * cell))
        r, g, b = pixels[y, x]
        assert max(r, g, b) - min(r, g, b) <= 2, (ax.get_label(), (r, g, b))  # a gray
        signed = ax.images[0].get_clim()[0] < 0
        if signed:
            # Dark gray: far from every colour of the blue-white-red scale.
            scale = np.asarray(ax.images[0].get_cmap()(np.linspace(0, 1, 256)))[:, :3] * 255
            assert np.abs(scale - (r, g, b)).max(axis=1).min() > 40, ax.get_label()
        else:
            # The page shows through, and each map has its frame.
            assert (r, g, b) == (255, 255, 255), ax.get_label()
            frames = [c for c in ax.collections if len(c.get_paths()) > 1]
            assert len(frames) == 1 and len(frames[0].get_paths()) == 16
        checked["signed" if signed else "gray"] += 1
    assert checked["signed"] >= 3 and checked["gray"] >= 2


def test_pooling_window_panel_at_the_lecture_sizes():
    """The lecture's Figure 3: a 10×10 window moving by 5 over a 75×75 map gives 14×14."""
    model = figures.random_network("lecun83")
    image = np.zeros((83, 83), np.uint8)
    image[20:60, 30:50] = 255
    fig = figures.feature_maps_figure(model, image)
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert "stage2.pooling window" not in axes  # only the first stage that pools
    ax = axes["stage1.pooling window"]
    texts = [t.get_text() for t in fig.texts]
    assert "stage 1 · pooling window" in texts
    assert "10×10 window, step 5: 75×75 → 14×14" in texts
    assert "max, map 0 after norm; dots: 14×14 kept" in texts
    steps = {s.layer: s.values for s in figures.feature_maps(model, image)}
    before, after = steps["stage1.norm"][0], steps["stage1.pool"][0]  # (75, 75), (14, 14)
    np.testing.assert_array_equal(ax.images[0].get_array().data, before)
    # The window solid at the kept place nearest the middle (row and column 6 × 5 = 30),
    # dashed one step (5) right and one step down; pixel j spans [j - 1/2, j + 1/2].
    rects = [(p.get_x() + 0.5, p.get_y() + 0.5, p.get_width(), p.get_height(), p.get_linestyle())
             for p in ax.patches]  # fmt: skip
    assert rects == [(30, 30, 10, 10, "-"), (35, 30, 10, 10, "--"), (30, 35, 10, 10, "--")]
    # A dot at the centre of each of the 14×14 windows kept: window (i, j) covers
    # rows 5i … 5i + 9 and columns 5j … 5j + 9, so its centre is (5i + 4.5, 5j + 4.5).
    (dots,) = ax.get_lines()
    xs, ys = dots.get_xdata(), dots.get_ydata()
    assert len(xs) == 14 * 14
    centres = 5 * np.arange(14) + 4.5
    assert sorted(set(xs)) == list(centres) and sorted(set(ys)) == list(centres)
    # ... and the network's subsampled value there is the window's maximum.
    for x, y in zip(xs, ys, strict=True):
        i, j = int((y - 4.5) // 5), int((x - 4.5) // 5)
        assert after[i, j] == before[5 * i : 5 * i + 10, 5 * j : 5 * j + 10].max()


def test_pooling_label_of_other_networks():
    lenet5 = figures.random_network("lenet5")
    assert figures.pooling_label(lenet5.spec, 1) == "2×2 window, step 2: 28×28 → 14×14"
    assert figures.pooling_label(lenet5.spec, 2) == "2×2 window, step 2: 10×10 → 5×5"
    with pytest.raises(ValueError, match="stage 3 of lenet5 has no pooling"):
        figures.pooling_label(lenet5.spec, 3)
    image = np.zeros((32, 32), np.uint8)
    labels = [ax.get_label() for ax in figures.feature_maps_figure(lenet5, image, stage=1).axes]
    assert "stage1.pooling window" in labels
    labels = [ax.get_label() for ax in figures.feature_maps_figure(lenet5, image, stage=3).axes]
    assert not [label for label in labels if "pooling window" in label]  # stage 3 never pools


@pytest.mark.parametrize("fused", [True, False])
def test_pooling_panel_of_a_later_stage_and_none_without_pooling(fused):
    def bank():
        return FilterBankSpec(maps=4, kernel=3)

    spec = ArchitectureSpec(
        name="late",
        input=InputSpec(height=12, width=12),
        stages=(
            StageSpec(filters=bank()),
            StageSpec(filters=bank(), pool=PoolSpec(window=2, stride=2, fused=fused)),
        ),
        classifier=ClassifierSpec(classes=2),
    )
    fig = figures.feature_maps_figure(figures.random_network(spec), np.zeros((12, 12)))
    labels = [ax.get_label() for ax in fig.axes]
    assert [label for label in labels if label.endswith("pooling window")] == [
        "stage2.pooling window"
    ]
    assert "2×2 window, step 2: 8×8 → 4×4" in [t.get_text() for t in fig.texts]
    fig = figures.feature_maps_figure(sobel_net(3), np.zeros((12, 12)))  # one stage, no pool
    assert not [ax for ax in fig.axes if "pooling window" in ax.get_label()]


def test_maps_argument_is_checked(digits_model, digit_image):
    with pytest.raises(ValueError, match="maps must be a positive integer, got 0"):
        figures.feature_maps_figure(digits_model, digit_image, maps=0)
    with pytest.raises(TypeError, match="maps must be a positive integer, got 2.0"):
        figures.feature_maps_figure(digits_model, digit_image, maps=2.0)


def test_tile_with_repeated_values_by_hand():
    maps = np.array([[[1.0]], [[2.0]]])  # 2 maps of 1×1, each value drawn 3×3
    mosaic = figures.tile_maps(maps, repeat=3)
    # 2 columns (ceil(sqrt(2))) of 3×3 tiles, gap max(1, round(0.06 × 3)) = 1
    assert mosaic.shape == (3, 7)
    np.testing.assert_array_equal(mosaic.data[:, :3], 1.0)
    np.testing.assert_array_equal(mosaic.data[:, 4:], 2.0)
    assert mosaic.mask[:, 3].all() and mosaic.mask.sum() == 3
    np.testing.assert_array_equal(figures.untile(mosaic, 2, 1, 1), maps)
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 3, 4))
    for repeat in (1, 2, 6):
        np.testing.assert_array_equal(
            figures.untile(figures.tile_maps(maps, repeat), 5, 3, 4), maps
        )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16", "P", "L", "LA", "1"])
def test_any_image_mode_is_converted_as_training_does(digits_model, tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(
        rng.integers(0, 65536, (37, 23), dtype=np.uint16)
    )  # fmt: skip
    path = tmp_path / f"image.{'tiff' if mode == 'I;16' else 'png'}"
    image.save(path)
    steps = figures.feature_maps(digits_model, path)
    expected = prepare_image(load_image(path), (28, 28))
    np.testing.assert_array_equal(steps[0].values, expected.numpy())
    assert steps[0].values.shape == (1, 28, 28)


def test_not_an_image(digits_model, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        figures.feature_maps(digits_model, path)
    with pytest.raises(TypeError, match="model must be a network built by cnnkit.models.build"):
        figures.feature_maps(torch.nn.Linear(2, 2), path)


# --------------------------------------------------------------------------------------
# Sobel
# --------------------------------------------------------------------------------------


def test_sobel_templates():
    templates = {name: (angle, kernel) for name, angle, kernel in figures.sobel_templates()}
    assert [angle for angle, _ in templates.values()] == list(range(0, 360, 45))
    np.testing.assert_array_equal(templates["Gx"][1], SOBEL_GX)
    np.testing.assert_array_equal(templates["Gy"][1], SOBEL_GX.T)
    np.testing.assert_array_equal(templates["-Gx"][1], -SOBEL_GX)
    np.testing.assert_array_equal(templates["-Gy"][1], np.rot90(SOBEL_GX))
    # Counter-clockwise: Gx's positive side (left) turns to the lower left.
    np.testing.assert_array_equal(templates["Gx+45°"][1], [[0, -1, -2], [1, 0, -1], [2, 1, 0]])
    for angle in (45, 135):
        turned = np.rot90(templates[f"Gx+{angle}°"][1])
        np.testing.assert_array_equal(templates[f"Gx+{angle + 90}°"][1], turned)


def test_resize_kernel_by_hand():
    np.testing.assert_array_equal(figures.resize_kernel(SOBEL_GX, (3, 3)), SOBEL_GX)
    # Gx = [1, 2, 1]^T [1, 0, -1]; each factor is interpolated linearly, corners aligned.
    expected = np.outer([1, 1.5, 2, 1.5, 1], [1, 0.5, 0, -0.5, -1])
    np.testing.assert_allclose(figures.resize_kernel(SOBEL_GX, (5, 5)), expected)
    np.testing.assert_allclose(figures.resize_kernel(SOBEL_GX, (2, 4))[0], [1, 1 / 3, -1 / 3, -1])
    with pytest.raises(ValueError, match="size must be at least 2 on each side"):
        figures.resize_kernel(SOBEL_GX, (1, 5))


def test_sobel_scores_against_a_direct_computation():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(12, 4, 4))
    weight[5] = 0.0
    matches = figures.sobel_scores(weight, top=3)
    assert len(matches) == 8 * 3
    for name, angle, template in figures.sobel_templates():
        # A bank correlates: the stored kernel that convolves with the template is its 180° turn.
        s = figures.resize_kernel(np.rot90(template, 2), (4, 4)).ravel()
        cos = [
            0.0 if not w.any() else float(w.ravel() @ s / np.linalg.norm(w) / np.linalg.norm(s))
            for w in weight
        ]
        got = [m for m in matches if m.template == name]
        assert [m.rank for m in got] == [1, 2, 3] and all(m.angle == angle for m in got)
        assert [m.kernel for m in got] == list(np.argsort(cos)[::-1][:3])
        np.testing.assert_allclose([m.similarity for m in got], sorted(cos, reverse=True)[:3])


def sobel_net(kernel: int):
    spec = ArchitectureSpec(
        name="edges",
        input=InputSpec(height=12, width=12),
        stages=(StageSpec(filters=FilterBankSpec(maps=4, kernel=kernel)),),
        classifier=ClassifierSpec(classes=2),
    )
    return figures.random_network(spec, seed=0)


def test_as_stored_turns_the_kernel_by_half_a_turn():
    kernel = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(figures.as_stored(kernel), np.rot90(kernel, 2))
    np.testing.assert_array_equal(figures.as_stored(SOBEL_GX), -SOBEL_GX)


@pytest.mark.parametrize(
    ("name", "axis", "sign"), [("Gx", 1, 1), ("Gy", 0, 1), ("-Gx", 1, -1), ("-Gy", 0, -1)]
)
def test_the_kernel_computing_a_derivative_in_a_bank_gets_its_name(name, axis, sign):
    """A ramp rising to the right (x, columns) or downwards (y, rows) through a FilterBank."""
    from cnnkit import tables
    from cnnkit.nn import FilterBank

    slope = 0.5
    ramp = torch.from_numpy(3.0 + slope * np.mgrid[0:8, 0:9][axis].astype(np.float64))
    bank = FilterBank(tables.full(1, 4), 3, bias=False).double()
    # Four kernels: the lecture's Gx and Gy as written and turned by 180°.
    candidates = [SOBEL_GX, -SOBEL_GX, SOBEL_GX.T, -SOBEL_GX.T]
    with torch.no_grad():
        bank.weight.copy_(torch.from_numpy(np.stack(candidates)))
    out = bank(ramp[None, None])[0].detach().numpy()  # (4, 6, 7)
    # The one kernel whose map is the constant sign * 8 * slope computes sign * d/d(axis) ...
    computes = [k for k in range(4) if np.allclose(out[k], sign * 8 * slope, atol=1e-12)]
    assert len(computes) == 1
    # ... and it is the one labelled with that derivative's template, with cosine 1.
    match = next(m for m in figures.sobel_scores(bank.weight) if m.template == name)
    assert match.kernel == computes[0]
    assert match.similarity == pytest.approx(1.0, abs=1e-12)


def test_network_with_sobel_first_filter_ranks_it_first():
    model = sobel_net(3)
    with torch.no_grad():  # the stored kernel that makes the bank convolve with Gx: -Gx
        model.stage1.filters.weight[0] = torch.from_numpy(-3 * SOBEL_GX)
    report = figures.sobel_report(model, 1, top=4)
    gx = [m for m in report.matches if m.template == "Gx"]
    assert gx[0].kernel == 0 and gx[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert (gx[0].input_map, gx[0].output_map) == (0, 0)
    minus = [m for m in report.matches if m.template == "-Gx"]
    assert minus[-1].kernel == 0 and minus[-1].similarity == pytest.approx(-1.0, abs=1e-6)
    assert "Gx" in report.to_text() and json.loads(json.dumps(report.to_dict()))["stage"] == 1


def test_resized_sobel_in_digits28_ranks_first(digits_model):
    model = figures.random_network("digits28", seed=0)
    template = figures.resize_kernel(figures.as_stored(SOBEL_GX), (5, 5))
    with torch.no_grad():
        model.stage1.filters.weight[0] = torch.from_numpy(template)
    report = figures.sobel_report(model, 1)
    best = next(m for m in report.matches if m.template == "Gx")
    assert best.kernel == 0 and best.similarity == pytest.approx(1.0, abs=1e-6)
    fig = figures.filters_figure(model, 1, report=report)
    axes = {ax.get_label(): ax for ax in fig.axes}
    weight = model.stage1.filters.weight.detach().double().numpy()
    unit = weight / np.abs(weight).max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(
        figures.untile(axes["kernels"].images[0].get_array(), 16, 5, 5), unit
    )
    np.testing.assert_allclose(axes["match Gx"].images[0].get_array().data, unit[0])
    assert tuple(fig.get_size_inches() * figures.DPI) == pytest.approx((1070, 675))
    with pytest.raises(ValueError, match="report is of stage 1 .* not of stage 2"):
        figures.filters_figure(model, 2, report=report)


def test_chance_similarity_matches_random_kernels():
    rng = np.random.default_rng(5)
    template = figures.resize_kernel(SOBEL_GX, (5, 5)).ravel()
    best = []
    for _ in range(1000):
        w = rng.normal(size=(16, 25))
        best.append((w @ template / np.linalg.norm(w, axis=1) / np.linalg.norm(template)).max())
    assert figures.chance_similarity(16, (5, 5)) == pytest.approx(np.median(best), abs=0.02)


def test_kernel_errors(digits_model):
    with pytest.raises(ValueError, match="kernels must be at least 2×2"):
        figures.sobel_scores(np.zeros((3, 1, 1)))
    with pytest.raises(ValueError, match=r"table must have shape \(3, 2\) for 3 kernels"):
        figures.sobel_scores(np.ones((3, 3, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="stage must be between 1 and 2"):
        figures.stage_kernels(digits_model, 0)


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------


def test_curves_figure_draws_the_metrics():
    rows = [
        {"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.5 + 0.1 * e, "val_loss": 2.5 / e,
         "val_accuracy": [0.4, 0.7, 0.6][e - 1], "test_loss": None, "test_accuracy": None}
        for e in (1, 2, 3)
    ]  # fmt: skip
    fig = figures.curves_figure(rows, source="run x")
    axes = {ax.get_label(): ax for ax in fig.axes}
    lines = {line.get_label(): line for line in axes["accuracy"].get_lines()}
    assert set(lines) == {"train", "val", "best (epoch 2)"}  # no test values, no test line
    np.testing.assert_allclose(lines["val"].get_ydata(), [40, 70, 60])
    np.testing.assert_allclose(lines["best (epoch 2)"].get_xdata(), [2, 2])
    loss = {line.get_label(): line for line in axes["loss"].get_lines()}
    np.testing.assert_allclose(loss["train"].get_ydata(), [2.0, 1.0, 2 / 3])
    np.testing.assert_allclose(loss["train"].get_xdata(), [1, 2, 3])
    assert tuple(fig.get_size_inches() * figures.DPI) == pytest.approx((1000, 450))
    with pytest.raises(ValueError, match="run x: no epoch has finished yet"):
        figures.curves_figure([], source="run x")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


@pytest.fixture
def figure_calls(monkeypatch):
    """The keyword arguments of each call of ``figures.feature_maps_figure``, which still draws."""
    calls = []
    draw = figures.feature_maps_figure
    monkeypatch.setattr(
        figures, "feature_maps_figure", lambda *a, **k: calls.append(k) or draw(*a, **k)
    )
    return calls


def test_cli_show_writes_pngs(digit_image, tmp_path, capsys, figure_calls):
    out = tmp_path / "maps.png"
    assert main(["show", str(digit_image), "--preset", "digits28", "--out", str(out)]) == 0
    assert png_size(out) == (2170, 910)
    assert [k["note"] for k in figure_calls] == ["weights: seeded random (seed 0), not trained"]
    assert main(["show", str(digit_image), "--preset", "digits28", "--per-stage",
                 "--out", str(out)]) == 0  # fmt: skip
    assert png_size(tmp_path / "maps-stage1.png") == (2450, 520)
    assert png_size(tmp_path / "maps-stage2.png") == (2450, 520)
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'maps-stage2.png'}"


def test_cli_show_lecun83_default(digit_image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["show", str(digit_image)]) == 0
    assert png_size(tmp_path / "bar-maps.png") == (2170, 910)


def test_cli_run_verbs(run_dir, digit_image, tmp_path, capsys):
    out = tmp_path / "run-maps.png"
    assert main(["show", str(digit_image), "--run", str(run_dir), "--out", str(out)]) == 0
    assert png_size(out) == (2170, 910)
    assert f"wrote {out}" in capsys.readouterr().out
    capsys.readouterr()
    out = tmp_path / "filters.png"
    assert main(["filters", str(run_dir), "--out", str(out), "--format", "json"]) == 0
    assert png_size(out) == (1070, 675)
    report = json.loads(capsys.readouterr().out)
    assert report["kernels"] == 16 and len(report["matches"]) == 8
    assert {m["template"] for m in report["matches"]} >= {"Gx", "Gy", "-Gx", "-Gy"}
    assert main(["filters", str(run_dir), "--stage", "2", "--out", str(out), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "stage 2: 256 kernels 5×5" in text and "chance" in text
    out = tmp_path / "curves.png"
    assert main(["curves", str(run_dir), "--out", str(out)]) == 0
    assert png_size(out) == (1000, 450)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["curves", "{missing}"], "run folder '{missing}' does not exist"),
        (["filters", "{missing}"], "run folder '{missing}' does not exist"),
        (["show", "{image}", "--run", "{missing}"], "run folder '{missing}' does not exist"),
        (["show", "{text}"], "{text} is not a readable image"),
        (["show", "{image}", "--out", "{missing}/x.png"], "--out folder '{missing}' does not"),
        (["show", "{image}", "--out", "{folder}"], "--out '{folder}' is a folder"),
        (["show", "{image}", "--run", "{missing}", "--seed", "1"], "--seed sets random weights"),
        (["show", "{image}", "--checkpoint", "last"], "--checkpoint chooses a run's weights"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, digit_image, capsys):
    names = {
        "missing": tmp_path / "nowhere",
        "image": digit_image,
        "text": tmp_path / "a.jpg",
        "folder": tmp_path,
    }
    (tmp_path / "a.jpg").write_text("hello")
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnkit: error: ") and err.count("\n") == 1
    assert message.format(**names) in err


def test_cli_show_maps_option(digit_image, tmp_path, capsys, figure_calls):
    out = tmp_path / "maps.png"
    argv = ["show", str(digit_image), "--preset", "digits28", "--out", str(out)]
    assert main([*argv, "--maps", "2"]) == 0
    # 2 maps side by side need less than the least panel (2.7 in): 7 × 2.7 by
    # 0.5 + 2 × (0.75 + 2.7 + 0.45) inches.
    assert png_size(out) == (1890, 830)
    assert capsys.readouterr().out == f"wrote {out}\n"
    # More than any step has (digits28: 32 at most): all are drawn, and a note says so.
    assert main([*argv, "--maps", "1000"]) == 0
    assert capsys.readouterr().out == (
        f"note: --maps 1000 is more than any step has (at most 32); all drawn\nwrote {out}\n"
    )
    assert main([*argv, "--maps", "5", "--per-stage"]) == 0
    assert [k["maps"] for k in figure_calls] == [2, 1000, 5, 5]


def run_cnnkit(*argv):
    return subprocess.run(
        [sys.executable, "-m", "cnnkit", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --maps: must be an integer >= 1, got 0"),
        ("-1", "argument --maps: must be an integer >= 1, got -1"),
        ("x", "argument --maps: expected an integer >= 1, got 'x'"),
        ("2.5", "argument --maps: expected an integer >= 1, got '2.5'"),
    ],
)
def test_cli_show_bad_maps_is_one_line(value, message, digit_image):
    done = run_cnnkit("show", str(digit_image), "--maps", value)
    assert done.returncode == 2
    assert done.stderr == f"cnnkit: error: {message}\n"
    assert done.stdout == ""


def test_cli_show_help_names_the_maps_default():
    done = run_cnnkit("show", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--maps N" in text and f"(default: {figures.DEFAULT_MAPS})" in text
