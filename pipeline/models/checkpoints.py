"""Checkpoints: read from any fsspec URI, verify, unwrap and load into a model (torch).

The records of what a weight set is (``Weights``, checksums in URIs, categories) live in
``pipeline.models.weights``, which imports no torch, so the driver can parse flags and list inputs while
torch loads; see that module's docstring for the key layouts ``load_into`` and ``load_backbone`` take.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from pipeline.models.weights import WeightsError, read_verified, split_checksum


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, str]


def read_checkpoint(
    uri: str, *, expected_sha256: str | None = None, storage_options: dict | None = None
) -> LoadedCheckpoint:
    """Read a checkpoint from any fsspec URI, verify its sha256 and return its state dict."""
    data, digest = read_verified(uri, expected_sha256=expected_sha256, storage_options=storage_options)
    return parse_checkpoint(data, digest, split_checksum(uri)[0])


def parse_checkpoint(data: bytes, digest: str, path: str) -> LoadedCheckpoint:
    """The state dict in a checkpoint's bytes (read and verified already, e.g. by the driver)."""
    metadata: dict[str, str] = {}
    if data[:1] == b"{" or _looks_like_safetensors(data):
        try:
            state = load_safetensors(data)
            metadata = _safetensors_metadata(data)
        except Exception as exc:
            raise WeightsError(f"cannot parse {path} as safetensors: {exc}") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"cannot parse {path} as a torch checkpoint: {type(exc).__name__}: {exc}") from None
    return LoadedCheckpoint(_unwrap(state, path), digest, metadata)


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def _unwrap(state: object, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def num_classes_in(state: dict[str, torch.Tensor]) -> int | None:
    """Output channels of the main classifier: the last non-aux conv weight named *classifier*, by
    module index (``classifier.4`` after ``classifier.1``), not by the file's order: safetensors
    stores tensors in an order of its own."""
    keys = [
        k for k, v in state.items() if "classifier" in k and "aux" not in k and k.endswith("weight") and v.ndim == 4
    ]
    return int(state[max(keys, key=_module_order)].shape[0]) if keys else None


def _module_order(key: str) -> list[tuple[int, int, str]]:
    """A state-dict key's place in its model: numbered submodules by number, named ones by name."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def load_into(model: torch.nn.Module, checkpoint: LoadedCheckpoint, uri: str) -> None:
    """Load strictly; on mismatch raise one line naming the class counts, missing/unexpected keys and shapes."""
    own = model.state_dict()
    state = checkpoint.state_dict
    if not any(k.startswith("aux_classifier.") for k in own):
        # torchvision trains with an auxiliary head and ships it; inference never runs it.
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    problems = _mismatch(own, state)
    if problems:
        expected, found = num_classes_in(own), num_classes_in(state)
        if expected is not None and found is not None and expected != found:
            problems.insert(0, f"wrong class count: the model expects {expected} classes, the checkpoint has {found}")
        if _holds_only_backbone(model, state):
            problems.append(
                "it holds only backbone weights; pipeline.models.checkpoints.load_backbone loads them for training"
            )
        raise WeightsError(f"weights {uri} do not fit the model: " + "; ".join(problems))
    # A model built on the meta device takes the checkpoint's tensors as they are, in its own dtypes
    # (what a copy into allocated parameters would give): no second copy of the weights in memory.
    assign = any(t.is_meta for t in own.values())
    if assign:
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def _holds_only_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        return False
    mapped, unknown = _backbone_state(state, backbone)
    return not unknown and not _mismatch(backbone.state_dict(), mapped)


# Top-level names of ImageNet classification heads in torchvision and timm models.
_CLASSIFICATION_HEADS = ("fc.", "head.", "classifier.", "conv_head.", "bn2.")


def _backbone_state(
    state: dict[str, torch.Tensor], backbone: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state renamed to ``backbone``'s keys, keys that fit nowhere); classification heads are left out."""
    own = set(backbone.state_dict())
    mapped, unknown = {}, []
    for key, value in state.items():
        first, _, rest = key.partition(".")
        candidates = (key, key.removeprefix("features."), f"{first}_{rest}")
        target = next((c for c in candidates if c in own), None)
        if target is not None:
            mapped[target] = value
        elif not key.startswith(_CLASSIFICATION_HEADS):
            unknown.append(key)
    return mapped, unknown


def load_backbone(
    model: torch.nn.Module, uri: str, *, storage_options: dict | None = None, expected_sha256: str | None = None
) -> str:
    """Initialise ``model.backbone`` from a torchvision/timm classification checkpoint; returns its sha256.

    Everything but the classification head must fit, strictly: a checkpoint of another
    architecture fails with the keys that do not fit instead of half-loading.
    """
    checkpoint = read_checkpoint(uri, expected_sha256=expected_sha256, storage_options=storage_options)
    backbone = model.get_submodule("backbone")
    mapped, unknown = _backbone_state(checkpoint.state_dict, backbone)
    problems = _mismatch(backbone.state_dict(), mapped)
    if unknown:
        problems.insert(0, f"unknown keys {_few(sorted(unknown))}")
    if problems:
        raise WeightsError(f"weights {uri} do not fit the backbone: " + "; ".join(problems))
    backbone.load_state_dict(mapped, strict=True)
    return checkpoint.sha256


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_errors = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatch {_few(shape_errors)}")
    return problems


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
