"""The app as a Ray Serve deployment on a local Ray cluster: CPU replicas of the toy pair (one torch thread each),
Ray's proxy on a free loopback port. A bounded load with every result accounted for, then a replica killed
mid-load: every request ends completed or clearly failed, and Ray replaces the replica.

Slow (a cluster and two replicas start), but not deselected: CI runs it with the rest.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from serve_support import QUIET_ENV, ROOT, SHORT, free_port, toy_config  # noqa: E402

from flowblend.errors import FlowblendError  # noqa: E402
from flowblend.serve.ray_app import RayOptions, build, build_app, deployment_options  # noqa: E402

pytestmark = pytest.mark.slow
_spec = importlib.util.spec_from_file_location("loadgen", ROOT / "scripts" / "loadgen.py")  # a client: scripts/
loadgen = sys.modules["loadgen"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(loadgen)
replica_pids, run_load = loadgen.replica_pids, loadgen.run_load
BODY = {"prompt": "a red circle moving left", "steps": SHORT}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    results = tmp_path_factory.mktemp("ray-results")
    ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": QUIET_ENV}, _node_ip_address="127.0.0.1")  # loopback only
    port = free_port()
    # Ray waits 60 s (ray.serve._private.constants.HTTP_PROXY_TIMEOUT, no setting of its own) for its proxy actor
    # to start; beside other load on 2 cores it took longer and the fixture errored: give it what a loaded CI needs
    import ray.serve._private.api as serve_api
    serve_api.HTTP_PROXY_TIMEOUT = max(getattr(serve_api, "HTTP_PROXY_TIMEOUT", 60), 300)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(toy_config(results, queue_size=16), RayOptions(replicas=2, num_cpus=1)),
              name="flowblend", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", results
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas() -> int:
    status = serve.status().applications["flowblend"].deployments["flowblend"]
    return status.replica_states.get("RUNNING", 0)


def test_deployment_options_pass_autoscaling_and_gpus_through(tmp_path):
    fixed = deployment_options(toy_config(tmp_path), RayOptions(replicas=3))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"]["num_gpus"] == 0
    assert fixed["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    auto = deployment_options(toy_config(tmp_path, device="cuda"),
                              RayOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=3))
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 1
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}


def test_config_file_and_serve_run_arguments_build_the_app(tmp_path):
    import yaml

    spec = yaml.safe_load((ROOT / "docs" / "serve-ray.yaml").read_text())["applications"][0]
    assert spec["import_path"] == "flowblend.serve.ray_app:build"
    assert isinstance(build({**spec["args"], "results_dir": str(tmp_path)}), serve.Application)
    # `serve run flowblend.serve.ray_app:build steps=4 replicas=2` passes strings
    assert isinstance(build({"steps": "4", "replicas": "2", "results_dir": str(tmp_path)}), serve.Application)
    with pytest.raises(FlowblendError, match="unknown setting"):
        build({"colour": "red"})
    with pytest.raises(FlowblendError, match="cannot read plan"):
        build({"plan": "LQL", "results_dir": str(tmp_path)})


def test_bounded_load_loses_and_duplicates_nothing(deployment):
    url, results = deployment
    report = run_load(url, requests=40, concurrency=4, body=BODY, timeout=240)
    summary = report.summary()
    assert summary["completed"] == 40 and summary["lost"] == 0 and summary["duplicated"] == 0, \
        [o for o in report.outcomes if o.status != "completed"]
    owners = {httpx.get(f"{url}/v1/videos/{o.job_id}").json()["owner"] for o in report.outcomes}
    assert len(owners) == 2, "Ray should have spread the jobs over both replicas"
    assert len(list((results / "jobs").iterdir())) >= 40


def test_a_killed_replica_fails_its_jobs_clearly_and_is_replaced(deployment):
    url, _ = deployment
    before = replica_pids(url, 2)
    assert len(before) == 2
    victim = sorted(before)[0]
    killed = threading.Event()

    def kill_when_busy(report) -> None:
        if len(report.outcomes) >= 6 and not killed.is_set():
            killed.set()
            os.kill(victim, signal.SIGKILL)

    report = run_load(url, requests=24, concurrency=4, body={**BODY, "steps": 12}, timeout=240,
                      on_progress=kill_when_busy)
    assert killed.is_set()
    summary = report.summary()
    assert summary["lost"] == 0 and summary["duplicated"] == 0, report.outcomes
    assert summary["completed"] + summary["failed"] + summary["refused"] == 24
    for o in report.outcomes:
        if o.status != "completed":
            assert o.detail, o  # a failure says why (replica stopped / HTTP status)
    deadline, after = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        after = replica_pids(url, 2, attempts=20)
        if _running_replicas() == 2 and len(after) == 2 and victim not in after:
            break
        time.sleep(1)
    assert victim not in after and len(after) == 2 and _running_replicas() == 2, (before, after)
    again = run_load(url, requests=4, concurrency=2, body=BODY, timeout=120)
    assert again.summary()["completed"] == 4
