"""`cnnkit experiment`: a tiny study through the command line, and one-line errors."""

import pytest

from cnnkit.cli import main


def _error(capsys, argv, code=2):
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _exits(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ")
    return lines[0]


def test_unknown_study(capsys):
    line = _exits(capsys, ["experiment", "weights"])
    assert "invalid choice: 'weights' (choose from 'sharing', 'jarrett', 'grid')" in line


def test_bad_sizes_option(capsys):
    assert "expected sizes like 250,1000" in _exits(
        capsys, ["experiment", "sharing", "--sizes", "a"]
    )


def test_size_larger_than_the_split(capsys, tiny_npz, tiny_spec_file, tmp_path):
    argv = ["experiment", "sharing", "--data", str(tiny_npz), "--spec", str(tiny_spec_file)]
    line = _error(capsys, [*argv, "--sizes", "20,500", "--out", str(tmp_path / "x")])
    assert "--sizes: 500 is larger than the training split (60 images)" in line


def test_bad_grid_field(capsys, tmp_path, tiny_spec_file):
    grid = tmp_path / "g.toml"
    grid.write_text(f'spec = "{tiny_spec_file}"\n[grid]\n"classifier.hiden" = [8]\n')
    line = _error(capsys, ["experiment", "grid", str(grid), "--out", str(tmp_path / "o")])
    assert "field 'classifier.hiden' does not exist: classifier has no 'hiden'" in line


def test_folder_of_another_command(capsys, tmp_path, tiny_npz, tiny_spec_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    argv = ["experiment", "jarrett", "--data", str(tiny_npz), "--spec", str(tiny_spec_file)]
    line = _error(capsys, [*argv, "--quick", "--out", str(run)])
    assert "is a run folder (made by `cnnkit train`), not an experiment folder" in line


def test_grid_through_the_command_line(capsys, tmp_path, tiny_spec_file, tiny_npz):
    grid = tmp_path / "g.toml"
    grid.write_text(
        f'spec = "{tiny_spec_file}"\ndata = "{tiny_npz}"\n[training]\nepochs = 1\n'
        '[grid]\n"classifier.hidden" = [4, 8]\n'
    )
    out = tmp_path / "o"
    assert main(["experiment", "grid", str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[####################] 2/2" in printed
    assert "| classifier.hidden | weights | train | test | gap (points) |" in printed
    assert (
        f"wrote experiment.json, grid.png, results.csv, results.json, results.md in {out}"
        in printed
    )
    line = _error(capsys, ["experiment", "sharing", "--data", str(tiny_npz), "--out", str(out)])
    assert "holds a `cnnkit experiment grid` experiment, not sharing" in line
