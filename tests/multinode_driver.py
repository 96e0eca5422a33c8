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
- ``local_storage``: a config whose outputs are a local path, on the two-node cluster: refused;
- ``sweep_node_loss``: a Ray Tune sweep (tracking on, Tune's storage on S3) whose two concurrent
  trials land one per node; the trial on the worker node is lost with its node mid-trial, a fresh
  node joins, and the sweep finishes the other trials;
- ``submit``: ``histodiff submit pipeline --stages ingest`` to the head's dashboard (sources and
  outputs on S3); the ingest tasks' nodes are read from Ray's state API.
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


def kill_and_replace(cluster, worker, out_dir: str, thread: threading.Thread, result: dict) -> None:
    """Wait for ``kill-now`` (or the end of ``thread``); then SIGKILL the worker node and let a fresh one join.

    Ray starts a node only from the main thread: the work runs in ``thread`` and this is the fixture's hand.
    """
    while not os.path.exists(os.path.join(out_dir, "kill-now")) and thread.is_alive():
        time.sleep(0.2)
    if thread.is_alive():
        cluster.remove_node(worker, allow_graceful=False)
        result["new_worker"] = cluster.add_node(num_cpus=2, resources={"worker_node": 1}).node_id


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Start ``fn`` in a daemon thread; return it and the box its result (``got``) or error lands in."""
    box: dict = {}

    def body() -> None:
        try:
            box["got"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised by the caller, in the main thread
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, box


def sweep_node_loss(cluster, worker, out_dir: str, bucket: str, result: dict) -> None:
    """A sweep of 3 settings + "no synthetic": 2 trials at once, one per node; the worker node dies mid-trial."""
    from mlflow.tracking import MlflowClient

    from histodiff import sweep
    from histodiff.config import load_config
    from histodiff.runtime import init_ray
    from histodiff.storage import Store

    uri = f"sqlite:///{out_dir}/mlflow.db"
    cfg = load_config("tiny", [f"paths.root={bucket}/sweep", f"ray.address={cluster.address}",
                               f"tracking.tracking_uri={uri}", "tracking.experiment=multinode-sweep",
                               "sweep.guidance_scales=[2.0]", "sweep.thresholds=[0.5,0.8,0.9]",
                               "sweep.synthetic_fractions=[0.5]", "name=multinode-sweep"])
    lost = worker.node_id

    def trial(trial_cfg, parent_run_id):  # a closure: Ray ships it by value to the trials
        import ray

        node = ray.get_runtime_context().get_node_id()
        threshold = trial_cfg.synthesis.selector.threshold
        open(os.path.join(out_dir, f"trial-t{threshold}-{node}-pid{os.getpid()}"), "w").close()
        if node == lost:
            open(os.path.join(out_dir, "kill-now"), "w").close()
            time.sleep(300)  # the node dies under this trial
        time.sleep(3)  # long enough for the two trials to overlap
        return {"val_gain": threshold / 100, "test_gain": 0.0}

    init_ray(cfg)
    thread, box = in_thread(sweep.run, cfg, trial_fn=trial)
    kill_and_replace(cluster, worker, out_dir, thread, result)
    thread.join()
    if "error" in box:
        raise box["error"]
    got = box["got"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    result.update(trials=[{k: t[k] for k in ("key", "status", "error")} for t in got.trials],
                  num_failed=got.num_failed, recommended=got.recommended,
                  runs=[{"stage": r.data.tags.get("histodiff.stage"), "status": r.info.status,
                         "error": r.data.tags.get("histodiff.error"), "parent": r.data.tags.get("mlflow.parentRunId")}
                        for r in runs],
                  parent_run_id=got.parent_run_id,
                  sweep_dirs=Store(cfg.storage).list_dirs(cfg.paths.sweep),
                  marks=sorted(n for n in os.listdir(out_dir) if n.startswith("trial-")))


def submit_ingest(cluster, dashboard: str, out_dir: str, bucket: str, result: dict) -> None:
    """``histodiff submit pipeline --stages ingest`` to the head; read the ingest tasks' nodes from Ray's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    from histodiff.cli import main as cli
    from histodiff.data.builtin import write_builtin_data
    from histodiff.data.shards import read_manifest
    from histodiff.storage import Store

    src = write_builtin_data(f"{bucket}/builtin")  # the sources on S3 too: every node reads them
    root = f"{bucket}/submit"
    code = cli(["submit", "pipeline", "--stages", "ingest", "--address", dashboard, "--config", "tiny",
                f"paths.root={root}", f"paths.unlabeled_sources=[{src['unlabeled']}]",
                f"paths.labeled_source={src['labeled_train']}", "paths.labeled_test_source=null",
                "data.tiles_per_shard=32", "tracking.enabled=false", "ray.num_cpus=null", "name=multinode-submit"])
    client = JobSubmissionClient(dashboard)
    (job,) = [j for j in client.list_jobs() if j.submission_id]
    tasks = list_tasks(address=dashboard, filters=[("job_id", "=", job.job_id)], detail=True, limit=10_000,
                       raise_on_missing_output=False)
    chunks = [t for t in tasks if t.name.endswith("_process_chunk")]
    result.update(code=code, status=str(job.status), ingest_nodes=sorted({t.node_id for t in chunks}),
                  ingest_tasks=len(chunks),
                  tiles=read_manifest(f"{root}/shards/unlabeled", Store()).num_tiles)


def main(scenario: str, out_dir: str, bucket: str) -> None:
    from ray.cluster_utils import Cluster


    def free_port() -> int:  # not conftest's: importing it clears the S3 endpoint from the environment
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    head_args: dict = {"num_cpus": 2, "resources": {"head_node": 1}}
    dashboard = None
    if scenario == "submit":
        # A job's `python` is this interpreter (as on a cluster image); the dashboard takes jobs, on its own ports.
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        port = free_port()
        head_args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                         dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
                         runtime_env_agent_port=free_port())
        dashboard = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    worker = cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    os.environ["RAY_ADDRESS"] = cluster.address
    result: dict = {"scenario": scenario}
    try:
        cluster.wait_for_nodes()
        result["nodes"] = {"head": cluster.head_node.node_id, "worker": worker.node_id}
        if scenario == "sweep_node_loss":
            return sweep_node_loss(cluster, worker, out_dir, bucket, result)
        if scenario == "submit":
            return submit_ingest(cluster, dashboard, out_dir, bucket, result)
        from histodiff.config import load_config

        root = f"{out_dir}/local" if scenario == "local_storage" else f"{bucket}/{scenario}"
        cfg = load_config("tiny", [f"paths.root={root}", f"ray.address={cluster.address}", "ray.num_workers=2",
                                   "ray.cpus_per_worker=1", "ray.threads_per_worker=1",
                                   "ray.placement_strategy=STRICT_SPREAD", "ray.max_failures=3", "tracking.enabled=false",
                                   "denoiser.steps=12", "denoiser.checkpoint_every=4", "denoiser.report_every=4",
                                   f"name=multinode-{scenario}", *SMALL])
        from histodiff.runner import run_stage
        from histodiff.stages import pretrain

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
            from histodiff.runtime import init_ray

            init_ray(cfg)
            thread, box = in_thread(run_stage, pretrain, cfg, callbacks=callbacks)
            kill_and_replace(cluster, worker, out_dir, thread, result)
            thread.join()
            if "error" in box:
                raise box["error"]
            got = box["got"]
        from histodiff.checkpoint import model_meta
        from histodiff.storage import Store

        result.update(step=got.step, resumed_from=got.resumed_from,
                      exported_step=model_meta(cfg.paths.denoiser, Store(cfg.storage))["step"],
                      workers=sorted(n for n in os.listdir(out_dir) if n.startswith("rank")))
    except BaseException as exc:
        result["exception"] = f"{type(exc).__name__}: {exc}"[-3000:]
        raise
    finally:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f, default=str)
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
