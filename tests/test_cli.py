"""The command line: help, version, summary, and one-line errors for a user's mistakes."""

import json
import subprocess
import sys

import pytest

from cnnkit import __version__
from cnnkit.cli import main


def run(*argv):
    return subprocess.run(
        [sys.executable, "-m", "cnnkit", *argv], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"cnnkit {__version__}"
    done = run("--help")
    assert done.returncode == 0
    assert "summary" in done.stdout


def test_summary_lecun83_numbers(capsys):
    assert main(["summary", "--preset", "lecun83", "--dense", "1000", "1000", "100", "100"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    input_row = next(line for line in lines if line.startswith("input"))
    assert "1@83×83" in input_row and "6,889" in input_row
    first = next(line for line in lines if line.startswith("stage1.filters"))
    assert "64@75×75" in first and "5,184" in first
    # Fused pooling, shown as the lecture's two steps (Figures 3 and 4), marked *.
    pool = next(line for line in lines if line.startswith("stage1.pool"))
    assert "max pooling 10×10, stride 1 *" in pool and "64@66×66" in pool and "278,784" in pool
    subsample = next(line for line in lines if line.startswith("stage1.subsample"))
    assert "subsampling 5 *" in subsample and "64@14×14" in subsample and "12,544" in subsample
    third = next(line for line in lines if line.startswith("stage2.filters"))
    assert "256@6×6" in third and "331,776" in third and "4,096" in third
    assert "256@1×1" in next(line for line in lines if line.startswith("stage2.pool"))
    assert "363,237" in text
    assert "10,000,000,000" in text


def test_summary_json(capsys):
    assert main(["summary", "--format", "json", "--classes", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["units"] == 6889
    assert data["rows"][-1]["maps"] == 10
    rows = {row["name"]: row for row in data["rows"]}
    assert rows["stage1.pool"]["shape"] == "64@66×66" and rows["stage1.pool"]["units"] == 278_784
    assert rows["stage1.subsample"]["shape"] == "64@14×14"
    assert rows["stage1.pool"]["view"] == rows["stage1.subsample"]["view"] == "lecture"
    assert "view" not in rows["stage1.filters"]


def test_summary_input_override(capsys):
    assert main(["summary", "--input", "100", "100", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][1]["shape"] == "64@92×92"


def test_summary_spec_file(tmp_path, capsys):
    from cnnkit.models import from_name

    path = tmp_path / "net.toml"
    from_name("lenet5").save(path)
    assert main(["summary", "--spec", str(path)]) == 0
    assert "60,850" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "--preset", "nope"], "unknown preset 'nope'"),
        (["summary", "--spec", "/no/such/file.toml"], "does not exist"),
        (["summary", "--input", "20", "20"], "stage 2: a 9×9 filter bank needs at least 9×9"),
        (["summary", "--classes", "x"], "argument --classes: expected an integer >= 2, got 'x'"),
    ],
)
def test_user_errors_are_one_line(argv, message):
    done = run(*argv)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("cnnkit") and message in lines[-1]
    assert len([ln for ln in lines if ln.startswith("cnnkit: error")]) == 1
