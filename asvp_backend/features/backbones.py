"""timm backbones with explicit, never-silent weight resolution.

``weights='auto'`` tries, in order: an offline weight package registered for the model name
(``weights.OFFLINE_WEIGHTS``), then timm's own pretrained download; if both fail it raises
``WeightsUnavailableError`` naming what was tried. ``'random'`` is allowed but logged as a WARNING, and a
path loads that checkpoint strictly. The model is never left on random weights by accident, because
features from random weights look fine and are nearly useless.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from PIL import Image

from .device import inference_context, prepare_input, prepare_model, resolve_device
from .weights import (
    OFFLINE_WEIGHTS,
    WeightsMismatchError,
    WeightsUnavailableError,
    load_into,
    read_checkpoint,
    state_hash,
)

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
RANDOM = "random"
AUTO = "auto"
_RANDOM_SEED = 0  # random init is seeded so that 'random' names one reproducible state


@dataclass(frozen=True)
class BackboneSpec:
    name: str = DEFAULT_BACKBONE
    weights: str = AUTO  # 'auto' | 'random' | path to .safetensors/.pth


@dataclass
class Backbone:
    """A timm model in eval mode plus its eval transform; ``embed`` gives pooled pre-logit features."""

    name: str
    model: torch.nn.Module
    weights_hash: str
    preprocessing: dict[str, Any]
    device: torch.device
    weights_source: str = ""
    _transform: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._transform = timm.data.create_transform(**self.preprocessing, is_training=False)

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "head_hidden_size", None) or getattr(self.model, "num_features"))  # noqa: B009

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.preprocessing["input_size"]
        return int(c), int(h), int(w)

    @property
    def transform(self) -> Any:
        """timm eval transform (resize, centre crop, normalise); picklable for DataLoader workers."""
        return self._transform

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """float32 (n, dim): forward_features + forward_head(pre_logits=True)."""
        x = prepare_input(batch, self.device)
        with inference_context(self.device):
            model: Any = self.model  # timm models: forward_features / forward_head are not on nn.Module
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        return feats.float().cpu().numpy()

    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 logits (n, num_classes); only for models loaded with a head (e.g. the ImageNet check)."""
        if not self.num_classes:
            raise RuntimeError(f"backbone {self.name} was loaded without a classifier head")
        x = prepare_input(batch, self.device)
        with inference_context(self.device):
            return self.model(x).float().cpu()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed(torch.stack([self.transform(im) for im in images]))


def _create(name: str, num_classes: int | None) -> torch.nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        return timm.create_model(name, pretrained=False, **kwargs)


def _classifier_key(model: torch.nn.Module) -> str:
    return str(getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier")


def _num_classes_for(name: str, state: dict[str, torch.Tensor]) -> int:
    """Head size implied by a checkpoint: its classifier rows, else the default head if the tensor count
    matches a model with one, else none (features-only checkpoint)."""
    probe = _create(name, None)
    key = f"{_classifier_key(probe)}.weight"
    if key in state:
        return int(state[key].shape[0])
    n = sum(1 for k in state if not k.endswith("num_batches_tracked"))
    with_head = sum(1 for k in probe.state_dict() if not k.endswith("num_batches_tracked"))
    return int(getattr(probe, "num_classes")) if n == with_head else 0  # noqa: B009


def _from_state(name: str, state: dict[str, torch.Tensor], num_classes: int) -> torch.nn.Module:
    model = _create(name, num_classes)
    load_into(model, state)
    return model


def _has_timm_pretrained(name: str) -> bool:
    cfg = getattr(_create(name, None), "pretrained_cfg", {}) or {}
    return bool(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file"))


def _load_auto(name: str, allow_download: bool) -> tuple[torch.nn.Module, str]:
    tried: list[str] = []
    loader = OFFLINE_WEIGHTS.get(name)
    if loader is None:
        tried.append("offline package: none registered for this model")
    else:
        try:
            w = loader()
            return _from_state(name, w.state, w.num_classes), w.source
        except WeightsMismatchError:
            raise  # a wrong file is a bug to surface, not a reason to fall back
        except WeightsUnavailableError as e:
            tried.append(f"offline package: {e}")
    if not allow_download:
        tried.append("timm download: disabled")
    elif not _has_timm_pretrained(name):
        tried.append("timm download: timm has no pretrained weights for this model")
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                model = timm.create_model(name, pretrained=True)
            cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
            return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('url')}"
        except Exception as e:  # network errors come in many types
            tried.append(f"timm download: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise WeightsUnavailableError(
        f"no pre-trained weights for backbone {name!r}. Tried: "
        + "; ".join(tried)
        + ". Install the weight package, pass weights=<path to .safetensors/.pth>, or weights='random' "
        "(features from random weights are nearly useless)."
    )


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike = AUTO,
    device: str | torch.device = "auto",
    image_size: int | None = None,
    allow_download: bool = True,
) -> Backbone:
    """Build a backbone in eval mode on ``device`` with its preprocessing (``image_size`` overrides the
    square input size; resize/crop ratios stay timm's)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    dev = resolve_device(device)
    weights_str = str(weights)
    if weights_str == RANDOM:
        log.warning("backbone %s uses RANDOM weights: features will be nearly useless for transfer", name)
        model, source, digest = _create(name, None), RANDOM, RANDOM
    else:
        if weights_str == AUTO:
            model, source = _load_auto(name, allow_download)
        else:
            state = read_checkpoint(Path(weights_str))
            model, source = _from_state(name, state, _num_classes_for(name, state)), f"file:{weights_str}"
        digest = state_hash(model)
    model.eval()
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    pre = dict(timm.data.resolve_data_config(args, model=model))
    log.info(
        "backbone %s: weights %s (sha256 %s), device %s, input %s",
        name,
        source,
        digest[:12],
        dev,
        pre["input_size"],
    )
    model = prepare_model(model, dev)
    return Backbone(name=name, model=model, weights_hash=digest, preprocessing=pre, device=dev, weights_source=source)


def create_from_spec(spec: BackboneSpec, device: str = "auto", image_size: int | None = None) -> Backbone:
    return create_backbone(spec.name, spec.weights, device=device, image_size=image_size)


def save_timm_weights(backbone: Backbone, path: Path | str) -> Path:
    """Write the loaded state in timm layout as .safetensors (e.g. to ship converted weights to a GPU)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path))
    return path
