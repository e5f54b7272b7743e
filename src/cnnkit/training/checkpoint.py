"""Checkpoints: tensors in safetensors, everything else in JSON; never a pickle.

A checkpoint is one ``NAME.safetensors`` file, self-contained and written atomically:

- tensors ``model.<state-dict key>`` — the model's parameters and persistent buffers;
- tensors ``optimizer.<parameter index>.<key>`` — the optimizer's per-parameter state
  (momentum buffers, Adam's moments and step counts), in ``last`` only;
- header metadata (safetensors' ``__metadata__``, strings only): ``format``, ``sha256`` —
  a digest of every tensor's name, dtype, shape and bytes — and ``meta``, a JSON object
  with the epoch, step, scalars and the position in the data order needed to resume.

Next to it, ``NAME.json`` repeats ``meta`` for people and tools (the *sidecar*). The copy
inside the ``.safetensors`` file is the one that counts: a kill between the two writes
leaves a complete checkpoint whose sidecar is one save behind, which resuming rewrites.

Reading parses the header with a few lines of Python, then hands the bytes to
safetensors' loader (which only ever copies numbers), then recomputes the digest. A
truncated or corrupted file, a file of another kind renamed ``.safetensors`` (a pickle,
a zip archive), or a safetensors file this package did not write is refused with a
:class:`CheckpointError` naming the file and what is wrong; nothing in it is executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cnnkit._files import write_atomic

FORMAT = "cnnkit-checkpoint/1"
MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
# safetensors' own limit on the JSON header; anything larger is not a checkpoint of ours
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: damaged, truncated, foreign or mismatched."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk and verified.

    ``model`` maps state-dict keys to tensors; ``optimizer`` maps
    ``"<parameter index>.<key>"`` to tensors (empty for weights-only checkpoints);
    ``meta`` is the JSON object written with it.
    """

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    meta: dict[str, Any]


def sidecar_path(path: str | Path) -> Path:
    """``last.safetensors`` -> ``last.json``."""
    return Path(path).with_suffix(".json")


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    model_state: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint and its JSON sidecar, each atomically.

    ``model_state`` is a model's ``state_dict()``; ``optimizer_state`` is the output of
    :func:`optimizer_tensors`; ``meta`` must be JSON-serializable. A parameter that is
    not finite is refused (``CheckpointError``), so a checkpoint on disk is always one
    that training could continue from.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"refusing to save {path.name}: {key} holds NaN or inf")
        # clone: tied parameters share storage, which safetensors will not write twice
        tensors[MODEL_PREFIX + key] = value.detach().to("cpu").contiguous().clone()
    for key, value in (optimizer_state or {}).items():
        tensors[OPTIMIZER_PREFIX + key] = value.detach().to("cpu").contiguous().clone()
    meta_text = json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    header = {"format": FORMAT, "sha256": tensor_digest(tensors), "meta": meta_text}
    write_atomic(path, save_safetensors(tensors, metadata=header))
    write_atomic(sidecar_path(path), _sidecar_text(path, header))


def _sidecar_text(path: Path, header: Mapping[str, str]) -> str:
    sidecar = {"checkpoint": path.name, "sha256": header["sha256"], **json.loads(header["meta"])}
    return json.dumps(sidecar, indent=2, sort_keys=True) + "\n"


def read_checkpoint(path: str | Path, *, repair_sidecar: bool = False) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` if there is no file, and :class:`CheckpointError`
    (a ``ValueError``) for anything that is not a complete, intact cnnkit checkpoint.
    ``repair_sidecar`` rewrites a missing or stale ``.json`` sidecar from the checkpoint
    (resuming does this; readers leave the folder untouched).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    blob = path.read_bytes()
    header = _read_metadata(path, blob)
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged or truncated ({error})"
        ) from None
    if tensor_digest(tensors) != header["sha256"]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its tensors do not match the digest "
            "recorded when it was written"
        )
    try:
        meta = json.loads(header["meta"])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: unreadable meta data")
    if repair_sidecar:
        _refresh_sidecar(path, header)
    model = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optimizer = {
        k[len(OPTIMIZER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)
    }
    return Checkpoint(path=path, model=model, optimizer=optimizer, meta=meta)


def _read_metadata(path: Path, blob: bytes) -> dict[str, str]:
    """Parse the safetensors header by hand: 8-byte little-endian length, then JSON."""
    not_ours = f"checkpoint {str(path)!r} is not a cnnkit checkpoint"
    if len(blob) < 8:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated ({len(blob)} bytes)")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{not_ours} (no safetensors header; a pickle or an archive?)")
    if 8 + length > len(blob):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated: its header needs {8 + length} bytes, "
            f"the file has {len(blob)}"
        )
    try:
        header = json.loads(blob[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{not_ours} (its header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{not_ours} (no {FORMAT!r} format tag in its header)")
    if not isinstance(metadata.get("sha256"), str) or not isinstance(metadata.get("meta"), str):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: incomplete header")
    return metadata


def _refresh_sidecar(path: Path, header: Mapping[str, str]) -> None:
    """Rewrite the sidecar if a kill between the two writes left it stale or missing."""
    sidecar = sidecar_path(path)
    text = _sidecar_text(path, header)
    try:
        if sidecar.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(sidecar, text)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint, without opening the checkpoint (for display)."""
    sidecar = sidecar_path(path)
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint sidecar {str(sidecar)!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint sidecar {str(sidecar)!r} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint sidecar {str(sidecar)!r} is not a JSON object")
    return data


# --------------------------------------------------------------------------------------
# Matching a checkpoint to a model and an optimizer
# --------------------------------------------------------------------------------------


def load_model_state(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's weights into ``model`` after checking names and shapes.

    A checkpoint of another architecture is a :class:`CheckpointError` naming the first
    missing, unexpected or differently shaped tensor.
    """
    expected = model.state_dict()
    found = checkpoint.model
    where = f"checkpoint {str(checkpoint.path)!r} is for another architecture"
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{where}: it has no tensor {missing[0]!r}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}: it has a tensor {unexpected[0]!r} the model lacks")
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape) or found[key].dtype != tensor.dtype:
            raise CheckpointError(
                f"{where}: {key!r} is {tuple(found[key].shape)} {found[key].dtype} in the "
                f"checkpoint but {tuple(tensor.shape)} {tensor.dtype} in the model"
            )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(found[key])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``"<index>.<key>" -> tensor``.

    Numbers that are not tensors (an old Adam's integer step) become 0-d float64 tensors.
    Hyper-parameters (``param_groups``) are not stored: they come from the run's config.
    """
    out: dict[str, torch.Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{index}.{key}"] = value
            elif isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{index}.{key}"] = torch.tensor(value, dtype=torch.float64)
            else:
                raise TypeError(f"optimizer state {index}.{key} is not a tensor: {value!r}")
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Restore per-parameter optimizer state saved by :func:`optimizer_tensors`."""
    current = optimizer.state_dict()
    n_params = sum(len(group["params"]) for group in current["param_groups"])
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in checkpoint.optimizer.items():
        index_text, _, key = name.partition(".")
        if not index_text.isdigit() or not key or int(index_text) >= n_params:
            raise CheckpointError(
                f"checkpoint {str(checkpoint.path)!r} holds optimizer state {name!r} that "
                f"does not fit this model's {n_params} parameters"
            )
        state.setdefault(int(index_text), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
