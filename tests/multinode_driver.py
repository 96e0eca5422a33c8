"""One multi-node scenario in its own process: a head and a worker node on this machine, then a stage.

``python tests/multinode_driver.py SCENARIO OUT_DIR BUCKET`` starts two Ray nodes with
``ray.cluster_utils.Cluster`` (each its own raylet and object store, ``num_cpus=2``), runs the
scenario against the head's address with every output on the S3 endpoint of the environment, writes
``OUT_DIR/result.json`` and stops both nodes. Its own process, because a test process can be
connected to only one Ray (the session's ``ray_local``), and ``RAY_ADDRESS`` is set so nothing in it
can attach to another Ray on the machine. Scenarios:

- ``spread``: pretraining with two Ray Train workers, ``placement_strategy=STRICT_SPREAD``;
- ``node_loss``: the same, and when the worker on the worker node passes step 6 (a checkpoint was
  written at 4) that node's processes are killed (``Cluster.remove_node(allow_graceful=False)``,
  which SIGKILLs its raylet and workers by PID) and a fresh node joins: Ray Train restarts the group
  there from the last complete checkpoint on S3;
- ``local_storage``: a config whose outputs are a local path, on the two-node cluster: refused.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.toys import write_synthetic_latents  # noqa: E402
from test_denoiser import SMALL  # noqa: E402


def where_callback(out_dir: str, lost_node: str | None):
    """Return a loop callback that records (rank, node) once per worker process and, for ``node_loss``,
    asks the driver to kill ``lost_node`` when its worker passes step 6 (then waits to be killed)."""
    def record(rank: int, step: int) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        mark = os.path.join(out_dir, f"rank{rank}-{node}-pid{os.getpid()}")
        if not os.path.exists(mark):
            open(mark, "w").write(str(step))
        if lost_node is not None and node == lost_node and step == 6:
            open(os.path.join(out_dir, "kill-now"), "w").close()
            time.sleep(120)  # the node dies under this worker

    return record


def main(scenario: str, out_dir: str, bucket: str) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head_node": 1}})
    worker = cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    os.environ["RAY_ADDRESS"] = cluster.address
    result: dict = {"scenario": scenario}
    try:
        cluster.wait_for_nodes()
        from histodiff.config import load_config

        root = f"{out_dir}/local" if scenario == "local_storage" else f"{bucket}/{scenario}"
        cfg = load_config("tiny", [f"paths.root={root}", f"ray.address={cluster.address}", "ray.num_workers=2",
                                   "ray.cpus_per_worker=1", "ray.threads_per_worker=1",
                                   "ray.placement_strategy=STRICT_SPREAD", "ray.max_failures=3", "tracking.enabled=false",
                                   "denoiser.steps=12", "denoiser.checkpoint_every=4", "denoiser.report_every=4",
                                   f"name=multinode-{scenario}", *SMALL])
        from histodiff.runner import run_stage
        from histodiff.stages import pretrain

        result["nodes"] = {"head": cluster.head_node.node_id, "worker": worker.node_id}
        write_synthetic_latents(cfg.paths.latents, 256)
        if scenario == "local_storage":
            from histodiff.config import ConfigError

            try:
                run_stage(pretrain, cfg)
                result["error"] = None
            except ConfigError as exc:
                result["error"] = str(exc)
            return
        lost = worker.node_id if scenario == "node_loss" else None
        callbacks = (where_callback(out_dir, lost),)
        if lost is None:
            got = run_stage(pretrain, cfg, callbacks=callbacks)
        else:
            # Ray starts a node only from the main thread: the stage runs in a thread, and this one is the
            # fixture's hand that kills the worker node and lets a new one join.
            from histodiff.runtime import init_ray

            init_ray(cfg)
            box: dict = {}

            def stage() -> None:
                try:
                    box["got"] = run_stage(pretrain, cfg, callbacks=callbacks)
                except BaseException as exc:  # re-raised below, in the main thread
                    box["error"] = exc

            thread = threading.Thread(target=stage, daemon=True)
            thread.start()
            while not os.path.exists(os.path.join(out_dir, "kill-now")) and thread.is_alive():
                time.sleep(0.2)
            if thread.is_alive():
                cluster.remove_node(worker, allow_graceful=False)
                result["new_worker"] = cluster.add_node(num_cpus=2, resources={"worker_node": 1}).node_id
            thread.join()
            if "error" in box:
                raise box["error"]
            got = box["got"]
        from histodiff.checkpoint import model_meta
        from histodiff.storage import Store

        result.update(step=got.step, resumed_from=got.resumed_from,
                      exported_step=model_meta(cfg.paths.denoiser, Store(cfg.storage))["step"],
                      workers=sorted(n for n in os.listdir(out_dir) if n.startswith("rank")))
    finally:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
