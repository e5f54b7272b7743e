"""A trained network as a file other programs run: ONNX, or a ``torch.export`` archive.

:func:`export_run` writes a run's network with a dynamic batch dimension, with the class
names, the input size and the gray-level rule in the file's metadata, then loads what it
wrote (onnxruntime for ONNX, ``torch.export.load`` for ``.pt2``), runs it on the run's
test images (or up to 256 validation images) and compares it with the eager network.

The exporters trace the plain path of every op (:mod:`cnnkit.kernels`), which is made of
standard operations only; the graph holds the network's weights as constants.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit import __version__
from cnnkit._files import write_atomic
from cnnkit._validation import check_choice
from cnnkit.training.run import LoadedRun, load_run

__all__ = ["FORMATS", "ExportResult", "export_run"]

FORMATS = ("onnx", "pt2")
OPSET = 18
_VERIFY_BATCH = 256
_VALIDATION_IMAGES = 256


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote and how the file compares with the eager network.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"pt2"``.
        split: the images it was checked on (``"test"`` or ``"val"``).
        images: how many.
        max_difference: the largest ``|exported - eager|`` over all logits.
        agreement: the share of images whose predicted class is the same.
    """

    path: Path
    format: str
    split: str
    images: int
    max_difference: float
    agreement: float

    @property
    def ok(self) -> bool:
        """Every prediction agrees."""
        return self.agreement == 1.0

    def to_text(self) -> str:
        verdict = "every prediction agrees" if self.ok else "PREDICTIONS DIFFER (file kept)"
        return (
            f"wrote {self.path} ({self.format}); checked on {self.images} {self.split} images: "
            f"largest difference from the eager network {self.max_difference:.3g}, "
            f"{self.agreement:.2%} of predictions agree: {verdict}"
        )


def export_run(
    run_dir: str | os.PathLike[str],
    *,
    format: str = "onnx",
    checkpoint: str = "best",
    out: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Export a run's network (``format`` ``"onnx"`` or ``"pt2"``) and check the file.

    Args:
        run_dir: a run folder written by ``cnnkit train``.
        format: ``"onnx"`` (opset 18) or ``"pt2"`` (a ``torch.export`` archive).
        checkpoint: ``"best"`` or ``"last"``.
        out: the file to write; default ``RUN_DIR/model.onnx`` or ``RUN_DIR/model.pt2``.

    Returns:
        An :class:`ExportResult`; ``result.ok`` is False when a prediction differs (the
        file is kept so that it can be inspected).
    """
    check_choice("format", format, FORMATS)
    check_choice("checkpoint", checkpoint, ("best", "last"))
    loaded = load_run(run_dir, checkpoint)
    path = Path(out) if out is not None else loaded.path / f"model.{format}"
    if path.is_dir():
        raise IsADirectoryError(f"out {str(path)!r} is a folder; name the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"out {str(path)!r}: folder {str(path.parent)!r} does not exist")
    split, images = _verification_images(loaded)
    model = loaded.model.eval()
    example = images[:2].to(loaded.device, next(model.parameters()).dtype)
    batch = torch.export.Dim("batch", min=1, max=4096)
    metadata = _metadata(loaded)
    with torch.no_grad():
        if format == "onnx":
            run = _write_onnx(model, example, batch, metadata, path)
        else:
            run = _write_pt2(model, example, batch, metadata, path)
        difference, agree = _compare(model, run, images.to(example.dtype))
    return ExportResult(path, format, split, len(images), difference, agree)


def _verification_images(loaded: LoadedRun) -> tuple[str, torch.Tensor]:
    from cnnkit.data import load

    recorded = loaded.config["data"]
    splits = load(
        recorded["source"],
        loaded.transform.input_hw,
        val_fraction=recorded.get("val_fraction") or 0.2,
        seed=recorded.get("seed") or 0,
    )
    if splits.test is not None:
        return "test", splits.test.images
    return "val", splits.val.images[:_VALIDATION_IMAGES]


def _metadata(loaded: LoadedRun) -> dict[str, str]:
    transform = loaded.transform.to_dict()
    return {
        "cnnkit_version": __version__,
        "class_names": json.dumps(loaded.class_names),
        "input_shape": json.dumps([1, *loaded.transform.input_hw]),
        "input_rule": transform["rule"],
        "input_description": "gray levels in [0, 1] (0..255 / 255), fitted to the input size",
        "checkpoint": loaded.checkpoint,
    }


def _write_onnx(model, example, batch, metadata, path):  # noqa: ANN001, ANN202
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 (the exporter's own dependency)
    except ImportError as error:
        raise ValueError(
            f"format 'onnx' needs the onnx, onnxscript and onnxruntime packages ({error}); "
            "install them with: pip install 'cnnkit[onnx]'"
        ) from error

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomic(path, proto.SerializeToString())
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(None, {"images": images.cpu().numpy()})
        return torch.from_numpy(logits)

    return run


def _write_pt2(model, example, batch, metadata, path):  # noqa: ANN001, ANN202
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"cnnkit.json": json.dumps(metadata)})
    write_atomic(path, buffer.getvalue())
    loaded = torch.export.load(str(path)).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        return loaded(images).cpu()

    return run


def _compare(model, run, images: torch.Tensor) -> tuple[float, float]:  # noqa: ANN001
    device = next(model.parameters()).device
    difference, agree = 0.0, 0
    chunks = [images[:1], *images[1:].split(_VERIFY_BATCH)]  # a batch of 1 and full ones
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        eager = model(chunk.to(device)).cpu()
        exported = run(chunk).to(eager.dtype)
        difference = max(difference, (exported - eager).abs().max().item())
        agree += int((exported.argmax(1) == eager.argmax(1)).sum())
    return difference, agree / len(images)
