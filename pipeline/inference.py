"""Multi-scale (+flip) DeepLab inference and the Ray Data actor that runs it.

Each scaled input is resized bilinearly (align_corners=False, like torchvision's DeepLab heads),
logits are upsampled back to the original size, turned into softmax probabilities and averaged
over scales and flips — DeepLab v3's evaluation protocol (Chen et al. 2017, Sec. 4.4).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from torch.nn import functional as F

from pipeline.config import InferenceConfig
from pipeline.models import build_model
from pipeline.tables import result_table
from pipeline.weights import categories_from, load_into, read_checkpoint


def multiscale_probs(model: torch.nn.Module, image: torch.Tensor, scales: tuple[float, ...], flip: bool) -> torch.Tensor:
    """Average softmax probabilities over ``scales`` (and horizontal flips) for a (N, 3, H, W) batch."""
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        x = image
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        logits = model(x)
        if flip:
            plain, mirrored = logits.chunk(2, dim=0)
            logits = torch.cat([plain, mirrored.flip(-1)], dim=0)
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.float().softmax(dim=1)
        if flip:
            probs = probs.view(2, -1, *probs.shape[1:]).sum(0)
        total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


def load_model(model_name: str, weights_uri: str, *, storage_options: dict | None = None,
               output_stride: int | None = None, num_classes: int | None = None,
               expected_sha256: str | None = None):
    """(model in eval mode, sha256, class names); num_classes from the checkpoint when not given."""
    checkpoint = read_checkpoint(weights_uri, expected_sha256=expected_sha256, storage_options=storage_options)
    if num_classes is None:
        num_classes = _infer_num_classes(checkpoint.state_dict)
    model = build_model(model_name, num_classes=num_classes, output_stride=output_stride)
    load_into(model, checkpoint, weights_uri)
    return model.eval(), checkpoint.sha256, categories_from(checkpoint.metadata, num_classes)


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The main classifier's output channels: the last non-aux conv weight named *classifier*."""
    candidates = [k for k in state if "classifier" in k and "aux" not in k and k.endswith("weight")
                  and state[k].ndim == 4]
    if not candidates:
        raise ValueError("cannot tell the number of classes from the checkpoint; pass --num-classes")
    return int(state[candidates[-1]].shape[0])


class Segmenter:
    """Ray Data callable class: model loaded once per actor, multi-scale inference per image.

    Emits per image the pre-CRF argmax mask and, when a CRF stage follows, the averaged
    probabilities as float16 (half the bytes of float32 through the object store).
    """

    def __init__(self, *, model: str, weights_uri: str, storage_options: dict, inference: InferenceConfig,
                 weights_sha256: str, num_classes: int, use_gpu: bool, threads: int, crf_follows: bool,
                 run_id: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model, self.sha256, categories = load_model(
            model, weights_uri, storage_options=storage_options, output_stride=inference.output_stride,
            num_classes=num_classes, expected_sha256=weights_sha256)
        self.model.to(self.device)
        self.model_name = model
        self.num_classes = len(categories)
        self.inference = inference
        self.crf_follows = crf_follows
        self.run_id = run_id
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    @torch.inference_mode()
    def _predict(self, rgb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(rgb.copy()).to(self.device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        x = (x - self.mean) / self.std
        return multiscale_probs(self.model, x, self.inference.scales, self.inference.flip)[0]

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["key"])
        out = {k: list(v) for k, v in batch.items()}
        out["mask_pre"], out["probs"], out["infer_ms"] = [b""] * n, [b""] * n, [0.0] * n
        out["infer_node"] = [self.node_id] * n
        for i in range(n):
            if out["error_stage"][i]:
                continue
            h, w = int(batch["height"][i]), int(batch["width"][i])
            rgb = np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3)
            start = time.perf_counter()
            try:
                probs = self._predict(rgb)
                out["mask_pre"][i] = probs.argmax(0).to(torch.uint8).cpu().numpy().tobytes()
                if self.crf_follows:
                    out["probs"][i] = probs.to(torch.float16).cpu().numpy().tobytes()
            except Exception as exc:  # one bad image (e.g. out of memory) must not stop the run
                out["error_stage"][i], out["error_type"][i] = "infer", type(exc).__name__
                out["error_message"][i] = f"inference failed: {exc}"[:1000]
                continue
            out["infer_ms"][i] = (time.perf_counter() - start) * 1000.0
        if self.crf_follows:
            return {k: np.array(v, dtype=object) if k in _BYTES_COLUMNS else np.array(v) for k, v in out.items()}
        out["mask"], out["crf_ms"], out["crf_node"] = [b""] * n, [0.0] * n, [""] * n
        return result_table(out, num_classes=self.num_classes, model=self.model_name,
                            weights_sha256=self.sha256, run_id=self.run_id)


_BYTES_COLUMNS = {"image", "label", "mask_pre", "probs", "mask"}
