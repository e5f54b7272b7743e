"""`cnnkit train --weight-sharing averaged`: untied kernels stay tied through training."""

import pytest
from safetensors.torch import load_file

from cnnkit.cli import main
from cnnkit.models import ArchitectureSpec


def test_averaged_run_keeps_every_position_equal(tiny_files, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--spec", str(tiny_files["spec"]), "--data", str(tiny_files["data"])]
    argv += ["--epochs", "1", "--weight-sharing", "averaged", "--out", str(out)]
    assert main([*argv, "--progress", "none"]) == 0
    spec = ArchitectureSpec.load(out / "spec.toml")
    assert spec.weight_sharing == "averaged" and spec.averaged_step == "scaled"
    weights = load_file(out / "last.safetensors")
    kernels = weights["model.stage1.filters.weight"]  # (H_out, W_out, K, kh, kw)
    assert kernels.shape[:2] == (10, 10)
    spread = (kernels - kernels[:1, :1]).abs().max()
    assert float(spread) < 1e-6
    assert float((kernels[0, 0] - kernels[0, 0].mean()).abs().max()) > 0  # it did learn


def test_averaged_step_needs_averaged_sharing(capsys):
    assert main(["train", "--averaged-step", "literal", "--epochs", "1"]) == 2
    assert "--averaged-step applies only with --weight-sharing averaged" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["tied", "AVERAGED"])
def test_bad_weight_sharing_value(value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--weight-sharing", value])
    assert exit_info.value.code == 2
