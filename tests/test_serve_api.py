"""The HTTP API over a warm toy pipeline (uvicorn on a free loopback port, in a thread): results, progress,
metrics, cancellation, the bounded queue, downloads, and every bad request refused with one line.

References: the video a job returns is compared with the pipeline called directly in-process (the
same TextToVideo the CLI runs); refusals are compared with the CLI's own messages for the same
values; metrics are read back with prometheus_client's parser.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serve_support import LONG, ROOT, ThreadedServer, toy_config, wait_final, wait_running, warm_toy_pipeline

from flowblend.cli.main import main as cli_main
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.video import save_video
from flowblend.serve.service import VideoService
from flowblend.serve.video_request import MAX_PROMPT_CHARS

PROMPT = "a blue square moving right"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ThreadedServer(toy_config(tmp_path_factory.mktemp("results")))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    yield server.client
    for job in server.service.store.list():  # leave nothing running for the next test
        if job.status in ("queued", "in_progress"):
            server.client.post(f"/v1/videos/{job.id}/cancel")
            wait_final(server.client, job.id)


def metric_samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_job_runs_and_returns_the_pipelines_video(client, server, tmp_path):
    before = metric_samples(client.get("/metrics").text)
    r = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 3, "plan": "LSL:0.4,0.2", "steps": 5})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "in_progress") and job["id"].startswith("video_") and job["object"] == "video"
    done = wait_final(client, job["id"])
    plan = BlendPlan.parse("LSL:0.4,0.2", 5)
    assert done["status"] == "completed", done
    assert (done["step"], done["steps"], done["models"], done["step_model"]) == (5, 5, list(plan.models), "large")
    assert done["timings"]["generate_seconds"] > 0 and set(done["timings"]["step_seconds_mean"]) == {"large", "small"}
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] in ("video/mp4", "image/gif")
    suffix = ".mp4" if "mp4" in content.headers["content-type"] else ".gif"
    served = iio.imread(io.BytesIO(content.content), extension=suffix).astype(np.float32)
    # reference: the same pipeline called in-process, written by the CLI's video writer
    spec = server.service.default_spec
    pipe = warm_toy_pipeline()._pipe(dataclasses.replace(spec, request=dataclasses.replace(spec.request, plan=plan)))

    def direct(seed: int) -> np.ndarray:
        video, _ = pipe(PROMPT, spec.request.latent_shape, seed=seed)
        return iio.imread(save_video(video, tmp_path / f"direct-{seed}{suffix}")).astype(np.float32)

    assert served.shape == direct(3).shape
    assert np.abs(served - direct(3)).max() <= 1.0  # same frames, same encoder settings
    assert np.abs(served - direct(4)).mean() > 4.0  # another seed is another video
    after = metric_samples(client.get("/metrics").text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("flowblend_step_seconds_count", model="large") == plan.count("large")
    assert delta("flowblend_step_seconds_count", model="small") == plan.count("small")
    assert delta("flowblend_jobs_finished_total", state="completed") == 1
    assert after[("flowblend_queue_depth", ())] == 0 and after[("flowblend_ready", ())] == 1
    listed = client.get("/v1/videos").json()["data"]
    assert job["id"] in [j["id"] for j in listed]


def test_health_says_ready_with_the_configuration(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["pair"] == "toy"


def _bad(client, body, raw: bytes | None = None):
    jobs_before = set((client._serve_root / "jobs").iterdir())
    r = client.post("/v1/videos", content=raw, headers={"content-type": "application/json"}) if raw is not None \
        else client.post("/v1/videos", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and len(message) < 400 and "Traceback" not in message
    # new entries only: an earlier test's deleted job may still be going away beside this request (a job DELETEd
    # while running is removed by its worker when it stops), which shrinks the folder without this request's doing
    left = set((client._serve_root / "jobs").iterdir()) - jobs_before
    assert not left, f"a refused request left a job behind: {sorted(p.name for p in left)}"
    return message


@pytest.fixture
def bad_client(client, server):
    client._serve_root = server.service.store.root
    return client


@pytest.mark.parametrize("raw, expect", [
    (b'{"prompt": "a red circle moving left",', "not valid JSON"),
    (b'{"prompt": "a red circle", "seed": }', "not valid JSON"),
    (b'"just a string"', "body"),
])
def test_malformed_json_is_refused_in_one_line(bad_client, raw, expect):
    assert expect in _bad(bad_client, None, raw)


@pytest.mark.parametrize("body, expect", [
    ({"prompt": PROMPT, "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": PROMPT, "guidance": -1.0}, "guidance"),
    ({"prompt": PROMPT, "steps": 0}, "steps must be between 1 and 400"),
    ({"prompt": PROMPT, "steps": 100000}, "steps must be between 1 and 400"),
    ({"prompt": PROMPT, "steps": 2.5}, "steps"),
    ({"prompt": "x" * 100 * 1024}, f"at most {MAX_PROMPT_CHARS}"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": "   "}, "no prompt given"),
    ({}, "prompt is required"),
    ({"prompt": PROMPT, "size": "big"}, "WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "model": "wan"}, "runs the toy pair"),
    ({"prompt": PROMPT, "plan": "L3,S2,L10000", "steps": 10005}, "steps must be between 1 and 400"),
])
def test_bad_values_are_refused_in_one_line(bad_client, body, expect):
    assert expect in _bad(bad_client, body)


GENERATE = ["generate", "--pair", "toy", "--out", "never-written.mp4"]


@pytest.mark.parametrize("body, cli_args", [
    ({"plan": "LXL"}, ["plan", "--pair", "toy", "--plan", "LXL"]),
    ({"plan": "LSL:0.9,0.9"}, ["plan", "--pair", "toy", "--plan", "LSL:0.9,0.9"]),
    ({"plan": "L2,S2", "steps": 5}, ["plan", "--pair", "toy", "--plan", "L2,S2", "--steps", "5"]),
    ({"plan": "LsLL", "steps": 4}, ["plan", "--pair", "toy", "--plan", "LsLL", "--steps", "4"]),  # cached, no full step
    ({"size": "30x32"}, ["plan", "--pair", "toy", "--width", "30", "--height", "32"]),
    ({"frames": 8}, ["plan", "--pair", "toy", "--frames", "8"]),
    ({"prompt": "a purple cat jumping"}, GENERATE + ["--prompt", "a purple cat jumping"]),
    ({"negative_prompt": "dog"}, GENERATE + ["--prompt", PROMPT, "--negative-prompt", "dog"]),
    ({"seed": 2**64}, GENERATE + ["--prompt", PROMPT, "--seed", str(2**64)]),
    ({"guidance": -1.0}, GENERATE + ["--prompt", PROMPT, "--guidance", "-1"]),
])
def test_refusals_are_the_cli_rules(bad_client, capsys, tmp_path, monkeypatch, body, cli_args):
    """Same value, same rule, same words: the server calls the CLI's checks rather than a copy of them."""
    message = _bad(bad_client, {"prompt": PROMPT, **body})
    monkeypatch.chdir(tmp_path)
    assert cli_main(cli_args) == 2
    cli_line = capsys.readouterr().err.strip().split("error: ", 1)[1]
    assert cli_line in message


def test_sizes_other_than_the_warm_one_are_refused_unless_dynamic(bad_client, tmp_path):
    assert "not a warm shape" in _bad(bad_client, {"prompt": PROMPT, "size": "64x64"})
    assert "not a warm shape" in _bad(bad_client, {"prompt": PROMPT, "guidance": 1.0})  # no CFG: other batch
    dynamic = ThreadedServer(toy_config(tmp_path, dynamic_shapes=True))
    try:
        r = dynamic.client.post("/v1/videos", json={"prompt": PROMPT, "size": "16x16", "frames": 3, "steps": 2})
        assert r.status_code == 202, r.text
        done = wait_final(dynamic.client, r.json()["id"])
        assert done["status"] == "completed", done
        assert iio.imread(dynamic.service.store.folder(done["id"]) / done["video"]).shape[:3] == (3, 16, 16)
    finally:
        dynamic.stop()


def test_unknown_job_ids_are_404(client):
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/nonsense", "/v1/videos/video_" + "0" * 32 + "/content"):
        r = client.get(path)
        assert r.status_code == 404 and "no job" in r.json()["error"]["message"], (path, r.text)
    outside = client.get("/v1/videos/..%2f..%2fetc%2fpasswd/content")
    assert outside.status_code == 404 and "Not Found" in outside.json()["error"]["message"]
    assert client.delete("/v1/videos/video_" + "1" * 32).status_code == 404


def test_a_deleted_running_job_is_not_answered_while_the_worker_removes_its_folder(client, server, monkeypatch):
    """DELETE of a running job: the worker removes the folder when the job stops. A GET right after the folder went
    must be a 404, not the job answered from the worker's memory (test_serve_openai's delete test met that now and
    then). The read is made at that very point, from inside the store's remove."""
    from flowblend.serve.service import ServiceError

    service, store, seen = server.service, server.service.store, []
    remove = store.remove

    def remove_then_read(job_id):
        remove(job_id)
        try:
            seen.append(service.get(job_id).status)
        except ServiceError as exc:
            seen.append(exc.status)

    monkeypatch.setattr(store, "remove", remove_then_read)
    job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
    wait_running(client, job["id"])
    assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == [404], seen


def test_running_job_cancels_at_a_step_boundary_and_twice_is_refused(client):
    job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
    running = wait_running(client, job["id"])
    assert running["status"] == "in_progress"
    early = client.get(f"/v1/videos/{job['id']}/content")
    assert early.status_code == 409 and "in_progress" in early.json()["error"]["message"]
    first = client.post(f"/v1/videos/{job['id']}/cancel")
    assert first.status_code == 202 and first.json()["cancel_requested"] is True
    second = client.post(f"/v1/videos/{job['id']}/cancel")
    assert second.status_code == 409 and "already being cancelled" in second.json()["error"]["message"]
    done = wait_final(client, job["id"])
    assert done["job_status"] == "cancelled" and 1 <= done["step"] < LONG, done
    third = client.post(f"/v1/videos/{job['id']}/cancel")
    assert third.status_code == 409 and "already cancelled" in third.json()["error"]["message"]
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert client.get("/health").json()["status"] == "ready"  # the worker goes on
    after = client.post("/v1/videos", json={"prompt": PROMPT})
    assert wait_final(client, after.json()["id"])["status"] == "completed"


def test_full_queue_gets_429_and_a_queued_job_cancels_at_once(client):
    running = client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
    wait_running(client, running["id"])
    queued = [client.post("/v1/videos", json={"prompt": PROMPT, "seed": i}) for i in range(2)]  # queue_size 2
    assert [r.status_code for r in queued] == [202, 202]
    full = client.post("/v1/videos", json={"prompt": PROMPT})
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert "queue is full" in full.json()["error"]["message"]
    dropped = client.post(f"/v1/videos/{queued[0].json()['id']}/cancel")
    assert dropped.status_code == 200 and dropped.json()["job_status"] == "cancelled" and dropped.json()["step"] == 0
    assert client.post(f"/v1/videos/{queued[0].json()['id']}/cancel").status_code == 409
    assert client.post("/v1/videos", json={"prompt": PROMPT}).status_code == 202  # room again


def test_a_client_that_disconnects_mid_download_harms_nothing(client, server):
    job = client.post("/v1/videos", json={"prompt": PROMPT}).json()
    assert wait_final(client, job["id"])["status"] == "completed"
    whole = client.get(f"/v1/videos/{job['id']}/content").content
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(f"GET /v1/videos/{job['id']}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # closed after 64 bytes of a larger file
    assert len(whole) > 64
    time.sleep(0.2)
    assert client.get(f"/v1/videos/{job['id']}/content").content == whole
    assert client.get("/health").json()["status"] == "ready"


def test_finished_jobs_survive_a_restart(server, client, tmp_path):
    job = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 11}).json()
    assert wait_final(client, job["id"])["status"] == "completed"
    video = client.get(f"/v1/videos/{job['id']}/content").content
    second = ThreadedServer(server.service.config)  # another server process's view of the same results dir
    try:
        assert second.service.store.owner != server.service.store.owner
        record = second.client.get(f"/v1/videos/{job['id']}").json()
        assert record["status"] == "completed" and record["request"]["seed"] == 11
        assert second.client.get(f"/v1/videos/{job['id']}/content").content == video
        assert job["id"] in [j["id"] for j in second.client.get("/v1/videos").json()["data"]]
    finally:
        second.stop()


def test_sampler_hook_sees_every_step_and_changes_nothing(server):
    """on_step runs between steps (never inside one): same latents with and without it, stop where asked."""
    spec = server.service.default_spec
    pipe = warm_toy_pipeline()._pipe(spec)
    seen = []
    _, with_hook = pipe(PROMPT, spec.request.latent_shape, seed=5, on_step=seen.append)
    _, without = pipe(PROMPT, spec.request.latent_shape, seed=5)
    assert seen == list(range(len(spec.plan))) and torch.equal(with_hook, without)

    class Stop(Exception):
        pass

    def stop_at_2(i):
        seen.append(i)
        if i == 2:
            raise Stop

    seen.clear()
    with pytest.raises(Stop):
        pipe(PROMPT, spec.request.latent_shape, seed=5, on_step=stop_at_2)
    assert seen == [0, 1, 2]


def test_config_errors_are_one_line_before_loading(tmp_path):
    from flowblend.errors import FlowblendError

    with pytest.raises(FlowblendError, match="cannot read plan"):
        VideoService.check_config(toy_config(tmp_path, plan="nonsense"))
    with pytest.raises(FlowblendError, match="multiples of 4"):
        VideoService.check_config(toy_config(tmp_path, width=30))


def test_calibrated_plans_are_found_by_name(bad_client, tmp_path, server):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "toy-calibrated.json").write_text(json.dumps(BlendPlan.parse("L2,S1,L1", 4).to_dict()))
    named = ThreadedServer(toy_config(tmp_path / "results", plans_dir=str(plans)))
    try:
        r = named.client.post("/v1/videos", json={"prompt": PROMPT, "plan": "toy-calibrated"})
        assert r.status_code == 202, r.text
        assert r.json()["models"] == ["large", "large", "small", "large"]
        bad = named.client.post("/v1/videos", json={"prompt": PROMPT, "plan": "no-such-plan"})
        assert bad.status_code == 400 and "toy-calibrated" in bad.json()["error"]["message"]
        assert wait_final(named.client, r.json()["id"])["status"] == "completed"
    finally:
        named.stop()



def test_readmes_client_example_runs_against_a_server(server, tmp_path, monkeypatch):
    """README's httpx block (fenced `py`: it needs a server, so tests/test_readme.py does not run it) runs as
    written against this test's server: the only change is the address."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Serving"):]
    block = re.search(r"^```py\n(.*?)^```", section, flags=re.S | re.M).group(1)
    assert "http://127.0.0.1:8000" in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("http://127.0.0.1:8000", server.url), "README.md serving block", "exec"), {})
    written = next(tmp_path.glob("*.mp4"))
    assert iio.imread(written).shape[:3] == (9, 32, 32)


def test_the_warm_up_is_a_job_through_the_workers_path_and_leaves_nothing(tmp_path, monkeypatch):
    """Nothing a job does is first done for a client's request: the warm-up request runs as a job (record saves,
    the video written into the results directory), then is gone: not listed, not counted, no folder."""
    import flowblend.serve.results as results  # where the worker's files are written

    written = []

    def recording_save_video(video, path, *args, **kwargs):
        written.append(Path(path))
        return save_video(video, path, *args, **kwargs)

    monkeypatch.setattr(results, "save_video", recording_save_video)
    stale = tmp_path / "results" / "jobs" / "warmup-12345-deadbeef"  # a server that died warming up
    stale.mkdir(parents=True)
    (stale / "job.json").write_text("{}")
    fresh = ThreadedServer(toy_config(tmp_path / "results"))
    try:
        jobs = tmp_path / "results" / "jobs"
        assert [p.parent.parent for p in written] == [jobs] and written[0].parent.name.startswith("warmup-")
        assert list(jobs.iterdir()) == [] and list((tmp_path / "results" / "queue").iterdir()) == []  # stale gone
        assert fresh.client.get("/v1/videos").json()["data"] == []
        samples = metric_samples(fresh.client.get("/metrics").text)
        assert not any(name.startswith(("flowblend_jobs_finished", "flowblend_step_seconds_count")) and value
                       for (name, _), value in samples.items())
        assert fresh.service.pipeline.load_seconds["warmup"] > 0
    finally:
        fresh.stop()


def test_a_plan_with_cached_steps_runs_and_its_record_names_them(client, server):
    """Issue 34: lower-case letters are cached steps; the job's record keeps them (the resolved request's plan)."""
    r = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 3, "plan": "LLlSsL", "steps": 6})
    assert r.status_code == 202, r.text
    done = wait_final(client, r.json()["id"])
    assert done["status"] == "completed", done
    plan = server.service.store.load(done["id"]).request["plan"]
    assert plan["cached"] == [2, 4] and plan["per_step"] == "LLlSsL" and plan["stages"] == "L2,l1,S1,s1,L1"
