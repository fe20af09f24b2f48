"""Device choice and GPU-memory housekeeping.

``cleanup_gpu_memory()`` runs between models so the next one starts with the
memory the previous one held: drop references (the caller's job), collect
garbage, empty PyTorch's CUDA cache and collect IPC handles.  On a machine
without CUDA it still collects garbage and reports ``cuda: False``: a measured
no-op, never an error.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Any

from workbench.errors import ConfigError


def _torch():
    try:
        import torch

        return torch
    except Exception:  # pragma: no cover - torch is a dependency, but keep io-only use possible
        return None


def cuda_available() -> bool:
    torch = _torch()
    return bool(torch is not None and torch.cuda.is_available())


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; ``cuda`` without CUDA is a CONFIG_ERROR."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda"):
        if not cuda_available():
            raise ConfigError(
                f"--device {device} was asked for but CUDA is not available on this machine",
                "Use --device auto or --device cpu.",
            )
        return device
    if device == "cpu":
        return "cpu"
    raise ConfigError(f"Unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")


def gpu_memory_mb() -> dict[str, float] | None:
    """Allocated, reserved and peak-allocated CUDA memory in MiB, or None without CUDA."""
    if not cuda_available():
        return None
    torch = _torch()
    mib = 1024 * 1024
    return {
        "allocated_mb": torch.cuda.memory_allocated() / mib,
        "reserved_mb": torch.cuda.memory_reserved() / mib,
        "peak_mb": torch.cuda.max_memory_allocated() / mib,
    }


def reset_peak_gpu_memory() -> None:
    if cuda_available():
        _torch().cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    On Linux this reads ``VmHWM`` from ``/proc/self/status``: unlike
    ``ru_maxrss`` it starts afresh at ``exec``, so a step's child process does
    not inherit the peak of the (larger) process that started it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def cleanup_gpu_memory() -> dict[str, Any]:
    """Collect garbage and release cached CUDA memory; return what was measured.

    Returns ``{"cuda": bool, "seconds": float, "gc_objects": int}`` plus
    ``before_mb``/``after_mb`` (reserved CUDA memory) when CUDA is present.
    """
    start = time.perf_counter()
    info: dict[str, Any] = {"cuda": cuda_available()}
    before = gpu_memory_mb()
    info["gc_objects"] = gc.collect()
    if before is not None:
        torch = _torch()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
        info["before_mb"] = before["reserved_mb"]
        info["after_mb"] = gpu_memory_mb()["reserved_mb"]
    info["seconds"] = time.perf_counter() - start
    return info
