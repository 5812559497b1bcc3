"""Helpers shared by the speed benchmarks (eval/benchmark_inference.py, eval/benchmark_train_step.py).

Timing syncs the device around each measured call; the reported figure is the median of the
repeats after warm-up. Memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset per stage), the
process's peak RSS on CPU (a high-water mark over the whole process, not per stage).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

# The APT paper's single-H100 timings for one 2 s 1280x720 24 fps clip (arXiv 2501.08316), and the
# 8-H100 total. These are the paper's figures, not measurements of ours.
PAPER_1xH100_SECONDS = {"text": 0.28, "dit": 2.65, "vae": 3.10, "total": 6.03}
PAPER_8xH100_TOTAL_SECONDS = 1.97
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 dense tensor-core peak (NVIDIA datasheet)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 1, repeats: int = 3) -> tuple[float, list[float], object]:
    """(median seconds, all timings, last result) of ``fn()`` after ``warmup`` untimed calls."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int:
    """``torch.cuda.max_memory_allocated`` on CUDA; the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment(device: torch.device | str) -> dict:
    """Device name, versions and thread settings, printed with every benchmark table."""
    device = torch.device(device)
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            if names:
                info["device_name"] = names[0]
        except OSError:
            pass
    return info


def randomize_zero_init(model: nn.Module) -> int:
    """Re-initialise zero-initialised linear layers (adaLN-Zero modulation, output layers) with
    PyTorch's default ``nn.Linear`` init; returns how many layers changed.

    A freshly built DiT outputs exactly zero; timings do not care, but output comparisons (FP8
    error, fast-path equivalence) need a non-trivial function. Seed the global RNG first.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.detach().any():
            module.reset_parameters()
            changed += 1
    return changed


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
