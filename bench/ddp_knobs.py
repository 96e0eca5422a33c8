"""What DDP's own settings do to the 2-worker denoiser step on the CPU (issue 18: where 2 workers lose time).

Two processes, one torch thread each, one DDP job over gloo (as two Ray Train workers get it from
``histodiff.train.common.prepare_ddp``, without Ray): the tiny denoiser's training step wrapped once
per variant (bucket size, static graph, bf16 / fp16 gradient compression, and ``no_sync``: the same
step with no all-reduce at all, the floor). The variants' steps alternate in blocks inside the same
two processes, so each one meets the same machine; the table is the mean ms per step over
``rounds`` x ``steps`` steps on each rank (the slower rank's).

    python -m bench.ddp_knobs --rounds 5 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from typing import Any

import torch

from bench.common import free_port, latent_shape, timed

# name -> (DistributedDataParallel keyword arguments beyond histodiff's DDP_KWARGS, comm hook name)
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "default": ({}, None),
    "bucket_cap_mb=2": ({"bucket_cap_mb": 2}, None),
    "bucket_cap_mb=100": ({"bucket_cap_mb": 100}, None),
    "static_graph": ({"static_graph": True}, None),
    "bf16_compress_hook": ({}, "bf16_compress_hook"),
    "fp16_compress_hook": ({}, "fp16_compress_hook"),
    "no_sync (no all-reduce)": ({}, None),
}


def _child(rank: int, port: int, preset: str, rounds: int, steps: int, out: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from histodiff.config import load_config
    from histodiff.train import denoiser as tr
    from histodiff.train.common import DDP_KWARGS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(preset)
    shape = latent_shape(preset)
    states = {}
    for name, (kwargs, hook) in VARIANTS.items():
        states[name] = tr.make_state(cfg.denoiser, shape, torch.device("cpu"), cfg.seed, wrap=lambda m, kw=kwargs:
                                     DistributedDataParallel(m, **DDP_KWARGS, **kw))
        if hook:
            states[name].model.register_comm_hook(None, getattr(default_hooks, hook))
    b = cfg.denoiser.batch_size
    batches = tr.in_memory_batches(torch.randn(b * 4, *shape), b, cfg.seed + rank)

    def step(name: str) -> None:
        state = states[name]
        with state.model.no_sync() if name.startswith("no_sync") else contextlib.nullcontext():
            tr.train_step(state, [next(batches)])

    ms: dict[str, float] = {name: 0.0 for name in states}
    for name in states:  # warm-up
        timed(functools.partial(step, name), torch.device("cpu"), warmup=0, measured=2)
    for _ in range(rounds):  # equal blocks: the mean of the block means is the mean over every step
        for name in states:
            dist.barrier()
            seconds = timed(functools.partial(step, name), torch.device("cpu"), warmup=0, measured=steps)
            ms[name] += 1000 * seconds / rounds
    dist.destroy_process_group()
    out.put(ms)


def measure(preset: str = "tiny", rounds: int = 5, steps: int = 8) -> dict[str, float]:
    """Return the mean ms per 2-worker DDP step of each variant (the slower rank's), measured side by side."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    children = [ctx.Process(target=_child, args=(rank, port, preset, rounds, steps, out)) for rank in range(2)]
    for child in children:
        child.start()
    got = [out.get(timeout=1800) for _ in children]
    for child in children:
        child.join()
    return {name: round(max(g[name] for g in got), 1) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds over the variants")
    p.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    table = measure(args.preset, args.rounds, args.steps)
    for name, ms in table.items():
        print(f"{name:26s} {ms:8.1f} ms/step")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
