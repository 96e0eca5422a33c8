"""Measurement helpers the benchmark areas share: step timing, peak matmul FLOP/s, the plain denoiser loop.

Only torch at import time: the ``gpu`` area runs on machines without Ray or MLflow.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import torch

WARMUP, MEASURED = 3, 12


def machine() -> str:
    """Return what a figure was measured on: the architecture, the CPU count and the GPU (or "no GPU")."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{platform.machine()} {os.cpu_count()} CPU cores" + (f", {gpu}" if gpu else ", no GPU")


def latent_shape(preset: str) -> list[int]:
    """Return the denoiser's latent shape (C, H, W) for a preset's tiles: the benchmarks' synthetic latents."""
    return [3, 8, 8] if preset == "tiny" else [3, 64, 64]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (for a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for on the CPU); return None."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], Any], device: torch.device, warmup: int = WARMUP, measured: int = MEASURED) -> float:
    """Return seconds per call of ``step`` over ``measured`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(measured):
        step()
    sync(device)
    return (time.perf_counter() - start) / measured


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Return the FLOP/s of an ``n``^3 matmul, bf16 on CUDA and fp32 on the CPU: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, warmup=1, measured=repeats)


def step_flops(state: Any, z: torch.Tensor) -> float:
    """Return the FLOPs of one denoiser ``train_step`` on batch ``z`` (forward + backward), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from histodiff.train import denoiser as tr

    with FlopCounterMode(display=False) as counter:
        tr.train_step(state, [z])
    return float(counter.get_total_flops())


def plain_rate(cfg: Any, shape: list[int], device: torch.device,
               wrap: Callable[[Any], Any] | None = None) -> tuple[float, float]:
    """Return (samples/s, FLOP/s) of the plain PyTorch denoiser loop over in-memory latents (``wrap``: e.g. DDP)."""
    from histodiff.train import denoiser as tr

    b = cfg.denoiser.batch_size
    state = tr.make_state(cfg.denoiser, shape, device, cfg.seed, wrap=wrap)
    batches = tr.in_memory_batches(torch.randn(b * 4, *shape, device=device), b, cfg.seed)
    flops = step_flops(state, next(batches))
    seconds = timed(lambda: tr.train_step(state, [next(batches)]), device)
    return b / seconds, flops / seconds
