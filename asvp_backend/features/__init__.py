"""Feature cache: timm backbones with offline weights, streaming extraction, a versioned store.

Names are re-exported lazily (PEP 562) so that ``from asvp_backend.features import FeatureStore`` does not
import torch/timm: the API process and store readers start in milliseconds instead of seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "backbones": ["DEFAULT_BACKBONE", "Backbone", "BackboneSpec", "create_backbone", "create_from_spec",
                  "save_timm_weights"],
    "device": ["DeviceUnavailableError", "configure_cpu_threads", "resolve_device"],
    "extract": ["ExtractReport", "extract_dir", "extract_items", "extract_to_store", "generation_info",
                "list_images", "matches"],
    "store": ["FeatureGeneration", "FeatureStore", "FeatureStoreError", "GenerationInfo"],
    "weights": ["OFFLINE_WEIGHTS", "LoadedWeights", "PackageWeights", "WeightsMismatchError",
                "WeightsUnavailableError", "register_offline_weights"],
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "Backbone",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "DeviceUnavailableError",
    "ExtractReport",
    "FeatureGeneration",
    "FeatureStore",
    "FeatureStoreError",
    "GenerationInfo",
    "LoadedWeights",
    "OFFLINE_WEIGHTS",
    "PackageWeights",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "configure_cpu_threads",
    "create_backbone",
    "create_from_spec",
    "extract_dir",
    "extract_items",
    "extract_to_store",
    "generation_info",
    "list_images",
    "matches",
    "register_offline_weights",
    "resolve_device",
    "save_timm_weights",
]
assert sorted(__all__) == sorted(_WHERE)

if TYPE_CHECKING:
    from .backbones import (
        DEFAULT_BACKBONE,
        Backbone,
        BackboneSpec,
        create_backbone,
        create_from_spec,
        save_timm_weights,
    )
    from .device import DeviceUnavailableError, configure_cpu_threads, resolve_device
    from .extract import (
        ExtractReport,
        extract_dir,
        extract_items,
        extract_to_store,
        generation_info,
        list_images,
        matches,
    )
    from .store import FeatureGeneration, FeatureStore, FeatureStoreError, GenerationInfo
    from .weights import (
        OFFLINE_WEIGHTS,
        LoadedWeights,
        PackageWeights,
        WeightsMismatchError,
        WeightsUnavailableError,
        register_offline_weights,
    )


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
