"""The HTML report: structure, inline images, numbers equal to ``evaluate``, errors."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.report import SECTIONS, write_report
from cnnkit.report.experiment import EXPERIMENT_SECTIONS
from tests.training.conftest import CLASS_NAMES, TINY_SPEC, stripes

TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "0.1", "--threads", "1"]
URL_ATTRIBUTES = ("src", "href", "action", "poster", "data", "srcset", "background")


class Page(HTMLParser):
    """Headings, images and every URL-like attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("h1", "h2", "h3"):
            self._heading = ""
        if tag == "img":
            self.images.append(dict(attrs))
        self.urls += [v or "" for k, v in attrs if k in URL_ATTRIBUTES]

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading.strip())
            self._heading = None


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def decode(image: dict[str, str | None]) -> Image.Image:
    src = image["src"] or ""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    picture = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    picture.load()
    return picture


def stripes_npz(path: Path, *, with_test: bool = True) -> Path:
    train_images, train_labels = stripes(20, seed=1)
    test_images, test_labels = stripes(6, seed=2)
    if with_test:
        arrays = {"train_images": train_images, "train_labels": train_labels,
                  "test_images": test_images, "test_labels": test_labels}  # fmt: skip
    else:
        arrays = {"images": train_images, "labels": train_labels}
    np.savez(path, class_names=np.asarray(CLASS_NAMES), **arrays)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 2-epoch run of the tiny network on stripes (with a test split), trained
    with ``--report``; and the spec and data files."""
    folder = tmp_path_factory.mktemp("report")
    spec = folder / "tiny.toml"
    spec.write_text(TINY_SPEC, encoding="utf-8")
    data = stripes_npz(folder / "stripes.npz")
    run = folder / "run"
    argv = ["train", "--spec", str(spec), "--data", str(data), "--out", str(run), *TRAIN]
    assert main([*argv, "--progress", "none", "--report"]) == 0
    return {"spec": spec, "data": data, "run": run, "folder": folder}


def test_train_report_writes_a_page_with_every_section(tiny: dict[str, Path]) -> None:
    path = tiny["run"] / "report.html"
    page = parse(path)
    for title in SECTIONS:
        assert title in page.headings
    assert "script" not in page.tags
    assert path.stat().st_size < 5_000_000


def test_every_image_is_an_inline_png_with_alt_text(tiny: dict[str, Path]) -> None:
    page = parse(tiny["run"] / "report.html")
    # curves, confusion, filters, 3 feature-map figures at least
    assert len(page.images) >= 6
    for image in page.images:
        assert (image.get("alt") or "").strip()
        picture = decode(image)
        assert picture.format == "PNG"
        assert 100 <= picture.width <= 4000 and 60 <= picture.height <= 4000
        # not blank: more than one colour
        assert len(picture.convert("L").getcolors(1 << 16) or []) > 2


def test_nothing_refers_outside_the_page(tiny: dict[str, Path]) -> None:
    page = parse(tiny["run"] / "report.html")
    text = (tiny["run"] / "report.html").read_text(encoding="utf-8")
    assert page.urls
    for url in page.urls:
        assert url.startswith("data:image/png;base64,"), url[:60]
    assert "http://" not in text and "https://" not in text
    assert "url(" not in text and "@import" not in text


def test_numbers_agree_with_evaluate_json(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for checkpoint in ("best", "last"):
        capsys.readouterr()
        assert main(["evaluate", str(tiny["run"]), "--checkpoint", checkpoint,
                     "--format", "json"]) == 0  # fmt: skip
        result = json.loads(capsys.readouterr().out)
        out = tmp_path / f"{checkpoint}.html"
        assert main(["report", str(tiny["run"]), "--checkpoint", checkpoint,
                     "--out", str(out), "--images", "1"]) == 0  # fmt: skip
        assert capsys.readouterr().out.strip() == f"wrote {out}"
        text = out.read_text(encoding="utf-8")
        accuracy = f"accuracy {100 * result['accuracy']:.2f}% "
        accuracy += f"({result['correct']:,}/{result['images']:,})"
        assert accuracy in text
        assert f"loss {result['loss']:.4f}" in text
        assert f"{checkpoint} checkpoint (epoch {result['epoch']})" in text
        for name, share in result["per_class"].items():
            c = result["class_names"].index(name)
            row = f"<td>{name}</td><td class=n>{100 * share:.2f}%</td>"
            row += f"<td class=n>{result['confusion'][c][c]}</td>"
            assert row in text
        assert "test split" in text


def test_images_option_sets_how_many_maps_are_drawn(tiny: dict[str, Path], tmp_path: Path) -> None:
    counts = {}
    for images in (0, 2):
        page = parse(write_report(tiny["run"], out=tmp_path / f"{images}.html", images=images))
        counts[images] = sum("feature maps" in (i.get("alt") or "") for i in page.images)
    assert counts == {0: 0, 2: 2}


def test_run_without_test_split_reports_the_validation_split(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    data = stripes_npz(tmp_path / "train-only.npz", with_test=False)
    run = tmp_path / "run"
    argv = ["train", "--spec", str(tiny["spec"]), "--data", str(data), "--out", str(run)]
    assert main([*argv, *TRAIN, "--epochs", "1", "--progress", "none"]) == 0
    text = write_report(run, images=1).read_text(encoding="utf-8")
    assert "validation split (the data has no test split)" in text
    assert "test split of" not in text


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnkit: error: "), err
    return err


def test_errors_are_one_line(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder: it has no config.json" in one_line_error(capsys)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_line_error(capsys)

    fresh = tmp_path / "fresh"
    shutil.copytree(tiny["run"], fresh)
    for name in ("best.safetensors", "best.json"):
        (fresh / name).unlink()
    assert main(["report", str(fresh)]) == 2
    assert "has no best checkpoint yet" in one_line_error(capsys)

    assert main(["report", str(tiny["run"]), "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert f"out folder {str(tmp_path / 'no')!r} does not exist" in one_line_error(capsys)
    assert main(["report", str(tiny["run"]), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in one_line_error(capsys)


def test_unwritable_output_is_one_line(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if _can_write(locked):
            pytest.skip("running as a user who can write anywhere")
        assert main(["report", str(tiny["run"]), "--out", str(locked / "r.html")]) == 2
        assert f"out folder {str(locked)!r} is not writable" in one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def test_a_failed_write_is_one_line(
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(path: object, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cnnkit.report.write.write_atomic", refuse)
    out = tmp_path / "r.html"
    assert main(["report", str(tiny["run"]), "--out", str(out), "--images", "0"]) == 2
    assert f"cannot write the report to {str(out)!r}: No space left on device" in one_line_error(
        capsys
    )
    assert not out.exists()


def _can_write(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


def test_experiment_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    (folder / "cells").mkdir(parents=True)
    (folder / "results.md").write_text("| cell | accuracy |\n|---|---|\n| a | 50.00% |\n")
    (folder / "results.json").write_text(json.dumps([{"cell": "a", "accuracy": 0.5}]))
    Image.new("L", (120, 80), 200).save(folder / "accuracy.png")
    shutil.copytree(tiny["run"], folder / "cells" / "a")  # holds report.html
    shutil.copytree(tiny["run"], folder / "cells" / "b")
    (folder / "cells" / "b" / "report.html").unlink()

    out = tmp_path / "elsewhere" / "page.html"
    out.parent.mkdir()
    path = write_report(folder, out=out)
    page = parse(path)
    for title in EXPERIMENT_SECTIONS:
        assert title in page.headings
    assert [decode(i).size for i in page.images] == [(120, 80)]
    text = path.read_text(encoding="utf-8")
    assert "| a | 50.00% |" in text
    links = [u for u in page.urls if not u.startswith("data:")]
    assert links == ["../exp/cells/a/report.html"]
    assert (out.parent / links[0]).resolve() == (folder / "cells" / "a" / "report.html")
    assert "cells/b (no report.html yet)" in text


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no headless Chromium on this machine")
@pytest.mark.parametrize("width", [1280, 390])
def test_page_renders_in_chromium(tiny: dict[str, Path], tmp_path: Path, width: int) -> None:
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={width},2400", f"--screenshot={shot}",
         (tiny["run"] / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    gray = np.asarray(Image.open(shot).convert("L"))
    assert gray.shape[1] == width
    assert gray.std() > 5  # not a blank page


def test_resume_with_report_writes_the_page(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    (run / "report.html").unlink()
    assert main(["train", "--resume", str(run), "--report", "--progress", "none"]) == 0
    assert "Feature maps" in parse(run / "report.html").headings
