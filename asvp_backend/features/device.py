"""Device choice and per-device inference settings (bf16 autocast + channels_last on CUDA, fp32 on CPU)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    """Raised when ``cuda`` is requested explicitly but no CUDA device is usable."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit ``cuda`` without a GPU is an error
    rather than a silent 50x slowdown."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {device!r} requested but torch.cuda.is_available() is False")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; choose one of {DEVICE_CHOICES}")


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to the usable CPUs, unless the user pinned OMP/MKL threads.

    Why: torch defaults to the host's physical cores, which oversubscribes containers limited by
    affinity/cgroups and fights DataLoader workers.
    """
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return torch.get_num_threads()
        num_threads = available_cpus()
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model for inference: eval mode, channels_last on CUDA (faster convs with bf16)."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    else:
        configure_cpu_threads()
    return model


def prepare_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return batch.to(device)


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """inference_mode plus bf16 autocast on CUDA; plain fp32 on CPU (bf16 on CPU is slower on most hosts)."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
