"""Denoiser pretraining: Ray Train overhead, MFU, memory vs dataset size, and scaling 1 -> 2 workers.

All figures come from one run on one machine, side by side:
- ``ray_train_overhead_ratio``: samples/s of 1 Ray Train worker streaming cached latents
  through Ray Data / samples/s of a plain PyTorch loop over the same latents in memory (same
  model, batch and thread count). Target >= 0.9.
- ``mfu_cpu``: training FLOP/s (FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``) /
  the FLOP/s of a 2048x2048 fp32 matmul measured in the same run, both at 1 thread, alternated
  and each one's best kept. Target >= 0.5 for the tiny preset. ``mfu_gpu`` belongs to the ``gpu`` area (the paper preset, plain PyTorch).
- ``rss_10x_over_1x``: peak RSS of the whole pretrain job (driver + local Ray) on 10x vs 1x the
  latents, each run for one pass over its data. Target <= 1.2 (the latents are streamed).
- ``two_vs_one_worker_ratio``: samples/s with 2 Ray Train workers vs 1, one thread each, the two
  alternated ``rounds`` times and each one's best kept. Target >= 1.7.
- ``two_plain_processes_vs_one_ratio``: the machine's own ceiling for the figure above: the plain
  PyTorch loop (no Ray, no DDP, no data loading) in two processes of one thread each, started
  together, vs in one process. Two workers cannot scale better than two independent loops do,
  so ``two_vs_one_worker_ratio`` is read against this (on a VM whose two vCPUs share a physical
  core or a memory bus, it is well under 2).
- ``two_ddp_processes_vs_one_ratio``: the ceiling once gradients are synchronised: the same two
  plain loops as one DDP job over gloo (every gradient all-reduced each step, as between Ray Train
  workers, but without Ray or Ray Data) vs one loop. The gap to the figure above is the all-reduce
  (its time for every gradient at once is in the goal); the gap from here to
  ``two_vs_one_worker_ratio`` is what Ray Train and Ray Data add.
- ``two_workers_in_memory_vs_one_ratio``: 2 Ray Train workers training on latents in memory (no
  Ray Data) vs the 1 streaming worker: splits that gap into Ray Train's part and Ray Data's.
- ``multinode_two_node_vs_one_node_ratio``: the same 2 workers placed on two Ray nodes (a head and a
  worker node of ``ray.cluster_utils.Cluster``, STRICT_SPREAD) vs both on one node (STRICT_PACK), on
  the same machine and the same CPUs: the cost of crossing nodes (gradients and data between two
  raylets and object stores). Target >= 0.9. Measured in a child process (one Ray per process),
  alternating the layouts twice and keeping each one's best.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import torch

from bench.common import MEASURED, WARMUP, free_port, latent_shape, matmul_flops, plain_rate, timed
from bench.toys import write_synthetic_latents

log = logging.getLogger(__name__)

def _bench_loop(config: dict) -> None:
    import ray.train

    from histodiff.config import config_from_dict
    from histodiff.runtime import device_for
    from histodiff.train import common
    from histodiff.train import denoiser as tr

    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    device = device_for(cfg.ray.use_gpu)
    state = tr.make_state(cfg.denoiser, config["shape"], device, cfg.seed, wrap=common.prepare_ddp)
    b = cfg.denoiser.batch_size
    if config["in_memory"]:  # no Ray Data: the plain loop's batches, inside a Ray Train worker
        rank = ray.train.get_context().get_world_rank()
        batches = tr.in_memory_batches(torch.randn(b * 4, *config["shape"], device=device), b, cfg.seed + rank)
    else:
        batches = tr._shard_batches(ray.train.get_dataset_shard("train"), b, device)
    waits: list[float] = []

    def step() -> None:
        t = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - t)
        tr.train_step(state, [batch])

    seconds = timed(step, device)
    rate = cfg.denoiser.batch_size * ray.train.get_context().get_world_size() / seconds
    if ray.train.get_context().get_world_rank() == 0:  # Result.metrics is only kept with checkpoints
        with open(config["out"], "w") as f:  # the data wait over the measured steps only
            json.dump({"rate": rate, "step_ms": 1000 * seconds,
                       "data_wait_ms": 1000 * sum(waits[-MEASURED:]) / MEASURED}, f)
    ray.train.report({"samples_per_s": rate})


def ray_rate(cfg: Any, shape: list[int], workers: int, threads: int, stage: str,
             placement: str | None = None, in_memory: bool = False) -> float:
    """Return the samples/s of ``workers`` Ray Train workers streaming the cached latents (the pretrain path);
    ``in_memory``: the workers train on random latents in memory instead (Ray Train without Ray Data)."""
    from histodiff.data.encode import latent_dataset
    from histodiff.data.readers import read_spec, rows_per_pass
    from histodiff.runner import Context
    from histodiff.storage import Store
    from histodiff.train import common

    cfg = cfg.model_copy(deep=True)
    cfg.ray.num_workers = workers
    cfg.ray.cpus_per_worker = 0.5 if workers > 1 else 1.0  # leave Ray Data a CPU on 2 cores
    if placement:
        cfg.ray.placement_strategy = placement
    store = Store(cfg.storage)
    out = os.path.join(cfg.paths.root, f"{stage}.rate")
    read = read_spec(cfg)
    data = None if in_memory else latent_dataset(cfg.paths.latents, store, read,
                                                 rows_per_pass=rows_per_pass(read, cfg.denoiser.batch_size, workers))
    ctx = Context(store=store, ray=cfg.ray, name=cfg.name, checkpoints_uri=cfg.paths.checkpoints, stage=stage)
    loop_config = {"cfg": cfg.public_dict(), "shape": shape, "threads": threads, "out": out, "in_memory": in_memory}
    common.build_trainer(ctx, _bench_loop, loop_config, stage, datasets=None if data is None else {"train": data}).fit()
    with open(out) as f:
        got = json.load(f)
    log.info("%s: %.1f samples/s, %.0f ms per step of which %.0f ms waiting for data (rank 0)",
             stage, got["rate"], got["step_ms"], got["data_wait_ms"])
    return float(got["rate"])


def _plain_child(cfg_dict: dict, shape: list[int], barrier: Any, out: Any, rank: int, world: int, port: int) -> None:
    from histodiff.config import config_from_dict

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    wrap, allreduce_ms = None, 0.0
    if world > 1:  # plain DDP over gloo, as a Ray Train worker gets it (histodiff.train.common.prepare_ddp)
        import torch.distributed as dist

        from histodiff.train.common import DDP_KWARGS

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, **DDP_KWARGS)  # noqa: E731
    barrier.wait()  # both loops start together: each one's measured steps overlap the other's
    rate = plain_rate(cfg, shape, torch.device("cpu"), wrap=wrap)[0]
    if world > 1:  # one all-reduce of every gradient at once, both processes otherwise idle
        from histodiff.models import denoiser as dn

        grads = torch.zeros(sum(p.numel() for p in dn.build_unet(cfg.denoiser, shape[0], shape[1]).parameters()))
        allreduce_ms = 1000 * timed(lambda: dist.all_reduce(grads), torch.device("cpu"))
        dist.destroy_process_group()
    out.put((rate, allreduce_ms))


def parallel_plain_rates(cfg: Any, shape: list[int], processes: int, ddp: bool = False) -> tuple[float, float]:
    """Return (summed samples/s, ms per gradient all-reduce) of ``processes`` plain 1-thread denoiser loops at once.

    ``ddp``: the processes are one DDP job over gloo (gradients all-reduced every step, as Ray Train's
    workers do, without Ray or Ray Data); otherwise they are independent (all-reduce time 0).
    """
    import multiprocessing as mp

    port = free_port()
    world = processes if ddp else 1
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    children = [ctx.Process(target=_plain_child,
                            args=(cfg.public_dict(), shape, barrier, out, rank if ddp else 0, world, port))
                for rank in range(processes)]
    for child in children:
        child.start()
    got = [out.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    return float(sum(rate for rate, _ in got)), max(ms for _, ms in got)


def two_node_rates(root: str, preset: str = "tiny", rounds: int = 2) -> dict[str, float]:
    """Return the best samples/s of 2 workers on one node and on two nodes (run in a process of its own).

    One machine's 2 CPUs either way: a head of 2 CPUs alone, or a head and a worker node of 1 CPU
    each. Each layout starts its own ``Cluster`` and stops it; the layouts alternate ``rounds`` times.
    """
    import ray
    from ray.cluster_utils import Cluster

    from histodiff.config import load_config

    shape = latent_shape(preset)
    batch = load_config(preset).denoiser.batch_size
    write_synthetic_latents(f"{root}/latents", batch * (WARMUP + MEASURED + 2) * 2, tuple(shape))
    best = {"one_node": 0.0, "two_nodes": 0.0}
    for r in range(rounds):
        for layout in best:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2 if layout == "one_node" else 1})
            try:
                if layout == "two_nodes":
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                ray.init(address=cluster.address)  # not init_ray: both nodes share this machine's disk
                sub = f"{root}/{layout}-{r}"
                cfg = load_config(preset, [f"paths.root={sub}", "tracking.enabled=false", "ray.use_gpu=false",
                                           f"paths.latents={root}/latents"])
                placement = "STRICT_PACK" if layout == "one_node" else "STRICT_SPREAD"
                rate = ray_rate(cfg, shape, 2, 1, f"bench-{layout}", placement)
                best[layout] = max(best[layout], rate)
                log.info("two-node bench round %d: %s %.1f samples/s", r, layout, rate)
            finally:
                ray.shutdown()
                cluster.shutdown()
    return best


def _two_node_figure(root: str, preset: str, rounds: int = 2) -> dict[str, float]:
    """Run :func:`two_node_rates` in a child process (this one already holds a Ray); return its rates."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import json, sys; from bench.areas.generative import two_node_rates; "
            f"print('RATES', json.dumps(two_node_rates({root!r}, {preset!r}, {rounds!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RATES ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the two-node benchmark failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][6:])


def _tree_rss(pid: int) -> int:
    """Return the summed RSS in bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _peak_rss_of(fn: Any) -> int:
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            stop.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return peak[0]


def run(workdir: str, preset: str = "tiny", two_node_rounds: int = 2, rounds: int = 2) -> dict[str, dict]:
    """Return the pretraining figures (see the module docstring), measured side by side."""
    import ray

    from histodiff.config import load_config
    from histodiff.models import denoiser as dn
    from histodiff.runner import run_stage
    from histodiff.stages import pretrain

    gpu = torch.cuda.is_available()
    root = os.path.abspath(os.path.join(workdir, uuid.uuid4().hex[:8]))
    base = [f"paths.root={root}", "tracking.enabled=false", f"ray.use_gpu={str(gpu).lower()}", "ray.address=null"]
    cfg = load_config(preset, base)
    shape = latent_shape(preset)
    b = cfg.denoiser.batch_size
    n_params = sum(p.numel() for p in dn.build_unet(cfg.denoiser, shape[0], shape[1]).parameters())
    n1 = b * (WARMUP + MEASURED + 2) * 2
    write_synthetic_latents(cfg.paths.latents, n1, tuple(shape))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=None if gpu else 2, include_dashboard=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the same thread count as one Ray worker below
        plain_sps = plain_flops = matmul = 0.0  # alternated, best of each (a single matmul swung MFU 0.43-0.56)
        for _ in range(rounds + 1):
            matmul = max(matmul, matmul_flops(torch.device("cpu")))
            sps, flops = plain_rate(cfg, shape, torch.device("cpu"))
            plain_sps, plain_flops = max(plain_sps, sps), max(plain_flops, flops)
        one_plain = two_plain = two_ddp = 0.0  # the ceilings for 2 workers: alternated, best of each
        allreduce_ms = float("inf")
        for _ in range(rounds):
            one_plain = max(one_plain, parallel_plain_rates(cfg, shape, 1)[0])
            two_plain = max(two_plain, parallel_plain_rates(cfg, shape, 2)[0])
            rate, ms = parallel_plain_rates(cfg, shape, 2, ddp=True)
            two_ddp, allreduce_ms = max(two_ddp, rate), min(allreduce_ms, ms)
        ray_one = ray_two = two_no_data = 0.0  # alternated, best of each: one round on 2 shared cores is noise
        for r in range(rounds):
            ray_one = max(ray_one, ray_rate(cfg, shape, 1, 1, f"bench-1w-{r}"))
            ray_two = max(ray_two, ray_rate(cfg, shape, 2, 1, f"bench-2w-{r}"))
            two_no_data = max(two_no_data, ray_rate(cfg, shape, 2, 1, f"bench-2w-mem-{r}", in_memory=True))
        rss = {}
        for factor in (1, 10):
            n = b * 4 * factor
            sub = load_config(preset, [*base, f"paths.root={root}/rss{factor}", f"denoiser.steps={n // b}",
                                       f"denoiser.checkpoint_every={n // b}", "denoiser.report_every=1000"])
            write_synthetic_latents(sub.paths.latents, n, tuple(shape))
            rss[factor] = _peak_rss_of(lambda: run_stage(pretrain, sub))
    finally:
        torch.set_num_threads(threads)
        if started:
            ray.shutdown()
    two_node = _two_node_figure(f"{root}/multinode", preset, two_node_rounds) if not gpu else None
    load = os.getloadavg()[0]
    measured = (f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs "
                f"{torch.cuda.get_device_name() if gpu else 'no GPU'} (load avg {load:.1f})")

    def figure(value: Any, unit: str, goal: str) -> dict[str, Any]:
        return {"value": value, "unit": unit, "goal": goal, "measured": measured}

    out = {
        "ray_train_overhead_ratio": figure(round(ray_one / plain_sps, 3), "ratio", ">= 0.9"),
        "mfu_cpu": figure(round(plain_flops / matmul, 3), "fraction of fp32 matmul FLOP/s",
                          f">= 0.5 (tiny); best of {rounds + 1} alternated rounds of the step and a 2048^3 matmul, "
                          f"1 thread ({matmul / 1e9:.1f} GFLOP/s)"),
        "rss_10x_over_1x": figure(round(rss[10] / rss[1], 3), "ratio", "<= 1.2"),
        "two_vs_one_worker_ratio": figure(round(ray_two / ray_one, 3), "ratio",
                                          f">= 1.7; best of {rounds} alternated rounds each"),
        "two_plain_processes_vs_one_ratio": figure(
            round(two_plain / one_plain, 3), "ratio",
            f"informational: this machine's ceiling for two_vs_one_worker_ratio (two plain 1-thread loops at once vs "
            f"one, no Ray; best of {rounds} alternated rounds each: {two_plain:.1f} vs {one_plain:.1f} samples/s)"),
        "two_ddp_processes_vs_one_ratio": figure(
            round(two_ddp / one_plain, 3), "ratio",
            f"informational: the ceiling for two_vs_one_worker_ratio once gradients are all-reduced: two plain "
            f"1-thread loops as one DDP job over gloo (no Ray, no Ray Data) vs one loop; best of {rounds} alternated "
            f"rounds each: {two_ddp:.1f} vs {one_plain:.1f} samples/s; one all-reduce of every gradient "
            f"({n_params / 1e6:.2f} M fp32) takes {allreduce_ms:.1f} ms with both processes otherwise idle"),
        "two_workers_in_memory_vs_one_ratio": figure(
            round(two_no_data / ray_one, 3), "ratio",
            f"informational: two_vs_one_worker_ratio without Ray Data: 2 Ray Train workers (DDP) on random latents in "
            f"memory vs 1 worker streaming; best of {rounds} alternated rounds each: {two_no_data:.1f} vs "
            f"{ray_one:.1f} samples/s (against two_ddp_processes_vs_one_ratio: what Ray Train adds; against "
            f"two_vs_one_worker_ratio: what streaming through Ray Data costs on busy cores)"),
        "denoiser_samples_per_s": figure({"plain_1thread": round(plain_sps, 1), "ray_1worker": round(ray_one, 1),
                                          "ray_2workers": round(ray_two, 1),
                                          "ray_2workers_in_memory": round(two_no_data, 1),
                                          "plain_2processes": round(two_plain, 1),
                                          "plain_ddp_2processes": round(two_ddp, 1)}, "samples/s", "informational"),
    }
    if two_node is not None:
        out["multinode_two_node_vs_one_node_ratio"] = figure(
            round(two_node["two_nodes"] / two_node["one_node"], 3), "ratio",
            f">= 0.9; 2 workers x 1 thread on two Ray nodes of 1 CPU vs one node of 2 CPUs, one machine "
            f"(best of {two_node_rounds} each: {two_node['two_nodes']:.1f} vs {two_node['one_node']:.1f} samples/s)")
    return out
