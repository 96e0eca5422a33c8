"""Several Ray nodes for real (issue 18): a head and a worker node on this machine, storage on S3.

Each scenario runs in its own process (``tests/multinode_driver.py``) with two Ray nodes of
``ray.cluster_utils.Cluster``, started and stopped there; outputs go to the test S3 endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histodiff.config import load_config
from histodiff.runtime import check_shared_storage, local_outputs

DRIVER = Path(__file__).with_name("multinode_driver.py")


def _scenario(name: str, tmp_path: Path, bucket: str) -> dict:
    out = tmp_path / name
    out.mkdir()
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([f"{root}/platform", root, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(DRIVER), name, str(out), bucket], env=env, capture_output=True,
                          text=True, timeout=900)
    result = out / "result.json"
    assert result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(result.read_text())
    got["returncode"], got["log"] = proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return got


def _ranks_by_node(workers: list[str]) -> dict[str, set[int]]:
    by_node: dict[str, set[int]] = {}
    for name in workers:  # rank{r}-{node}-pid{p}
        rank, node, _ = name.split("-")
        by_node.setdefault(node, set()).add(int(rank[4:]))
    return by_node


@pytest.mark.slow
def test_two_train_workers_on_two_nodes_both_train_to_the_target(s3_bucket, tmp_path):
    got = _scenario("spread", tmp_path, s3_bucket)
    assert got["returncode"] == 0, got["log"]
    assert got["step"] == got["exported_step"] == 12
    by_node = _ranks_by_node(got["workers"])
    # both nodes did work: each ran one of the two ranks (read from the workers themselves)
    assert set(by_node) == {got["nodes"]["head"], got["nodes"]["worker"]}
    assert sorted(r for ranks in by_node.values() for r in ranks) == [0, 1]


@pytest.mark.slow
def test_a_lost_worker_node_is_replaced_and_training_resumes_from_the_last_checkpoint_on_s3(s3_bucket, tmp_path):
    got = _scenario("node_loss", tmp_path, s3_bucket)
    assert got["returncode"] == 0, got["log"]
    assert got["step"] == got["exported_step"] == 12  # the final model is complete
    (resumed_step, _), = got["resumed_from"]
    assert resumed_step == 4 and 6 - resumed_step <= 4  # at most one checkpoint interval lost
    by_node = _ranks_by_node(got["workers"])
    assert got["nodes"]["worker"] in by_node and got["new_worker"] in by_node  # the new node took over


@pytest.mark.slow
def test_local_storage_on_a_two_node_cluster_is_refused_before_any_stage_runs(s3_bucket, tmp_path):
    got = _scenario("local_storage", tmp_path, s3_bucket)
    assert got.get("error") is not None and "has 2 nodes" in got["error"] and "paths.root=s3://" in got["error"], got
    local = tmp_path / "local_storage" / "local"
    assert not (local / "checkpoints").exists() and not (local / "models").exists()  # no stage ran


@pytest.mark.slow
def test_a_sweep_loses_a_trial_with_its_node_records_it_and_leaves_no_run_running(s3_bucket, tmp_path):
    got = _scenario("sweep_node_loss", tmp_path, s3_bucket)
    assert got["returncode"] == 0, got["log"]
    nodes = {m.split("-")[2] for m in got["marks"]}  # trial-t{threshold}-{node}-pid{p}, written by each trial
    assert got["nodes"]["head"] in nodes and got["nodes"]["worker"] in nodes  # trials ran on both nodes
    status = {t["key"]: t["status"] for t in got["trials"]}
    assert len(status) == 4 and list(status.values()).count("ERROR") == 1, got["trials"]
    lost = next(t for t in got["trials"] if t["status"] == "ERROR")
    assert got["num_failed"] == 1 and got["recommended"] is None  # a sweep with a hole recommends nothing
    assert lost["error"], got["trials"]
    assert "multinode-sweep-sweep" in got["sweep_dirs"]  # Tune's experiment is on S3
    runs = got["runs"]
    assert not [r for r in runs if r["status"] == "RUNNING"], runs  # no MLflow run left RUNNING
    killed = [r for r in runs if r["status"] == "KILLED"]
    assert len(killed) == 1 and killed[0]["stage"] == "trial" and "died" in killed[0]["error"]
    assert killed[0]["parent"] == got["parent_run_id"]
    assert sorted(r["status"] for r in runs if r["stage"] == "trial") == ["FINISHED"] * 3 + ["KILLED"]


@pytest.mark.slow
def test_submit_runs_ingest_on_the_multinode_head_with_tasks_on_both_nodes(s3_bucket, tmp_path):
    got = _scenario("submit", tmp_path, s3_bucket)
    assert got["returncode"] == 0 and got["code"] == 0 and got["status"].endswith("SUCCEEDED"), got["log"]
    assert got["tiles"] > 0 and got["ingest_tasks"] >= 2
    assert set(got["ingest_nodes"]) == {got["nodes"]["head"], got["nodes"]["worker"]}, got


def test_the_shared_storage_rule(tmp_path):
    local = load_config("tiny", [f"paths.root={tmp_path}"])
    check_shared_storage(local, 1)  # one node: a local path is fine (the laptop demo)
    with pytest.raises(ValueError, match=r"ray://head:10001 has 3 nodes, but paths\.root=\S+ \(and 14 more outputs\) is a local path"):
        check_shared_storage(local, 3, "ray://head:10001")
    remote = load_config("tiny", ["paths.root=s3://bucket/run"])
    assert local_outputs(remote) == []
    check_shared_storage(remote, 3)
    mixed = load_config("tiny", ["paths.root=s3://bucket/run", f"paths.checkpoints={tmp_path}/ck"])
    with pytest.raises(ValueError, match=r"paths\.checkpoints=.*/ck is a local path"):
        check_shared_storage(mixed, 2)
