"""The official `openai` SDK, unchanged, against the server (toy pair, uvicorn on a free loopback port): every
method of `client.videos`, each returned object validated strictly by the SDK's own pydantic models.

The SDK sends `create` as multipart/form-data (extra_body keys as form fields), pages `list` by `after` /
`has_more` / `last_id`, and raises its own exception types for our 4xx answers. `size` is the one field whose
SDK type (Sora's four sizes) cannot hold the toy pair's sizes: it is checked as the size made instead.
"""
from __future__ import annotations

import asyncio
import io
import re

import httpx
import imageio.v3 as iio
import numpy as np
import pytest
from serve_support import LONG, ROOT, ThreadedServer, toy_config, wait_running

openai = pytest.importorskip("openai")
from openai.types import Video, VideoDeleteResponse  # noqa: E402

PROMPT = "a blue square moving up"
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK marks videos.*


def strict(model, obj):
    """`obj` (an SDK object, as the server sent it) validated again by `model` in strict mode."""
    raw = obj.to_dict(mode="json") if hasattr(obj, "to_dict") else obj
    if model is Video:
        assert raw["size"] == "32x32", raw["size"]  # the SDK's Literal names only Sora's sizes
        raw = {**raw, "size": "720x1280"}
    return model.model_validate(raw, strict=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ThreadedServer(toy_config(tmp_path_factory.mktemp("sdk"), queue_size=8, api_key="test-key-1234"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key-1234", max_retries=0) as client:
        yield client


def test_create_and_poll_then_download_the_video_and_its_thumbnail(sdk, server):
    video = sdk.videos.create_and_poll(prompt=PROMPT, seconds="1", size="32x32", poll_interval_ms=100,
                                       extra_body={"seed": 3, "steps": 4})
    strict(Video, video)
    assert (video.status, video.progress, video.model, video.seconds, video.prompt) == \
        ("completed", 100, "toy", "1", PROMPT) and video.error is None
    assert video.completed_at >= video.created_at and video.to_dict()["request"]["seed"] == 3
    mp4 = sdk.videos.download_content(video.id).read()
    on_disk = (server.service.store.folder(video.id) / "video.mp4").read_bytes()
    assert mp4 == on_disk
    frames = iio.imread(io.BytesIO(mp4), extension=".mp4")
    assert frames.shape == (9, 32, 32, 3)  # seconds "1" at 8 fps: 9 frames (frames = seconds x 8 + 1)
    thumbnail = iio.imread(io.BytesIO(sdk.videos.download_content(video.id, variant="thumbnail").read()),
                           extension=".png")
    assert thumbnail.shape == (32, 32, 3)
    distance = [np.abs(thumbnail.astype(np.float32) - f).mean() for f in frames.astype(np.float32)]
    assert int(np.argmin(distance)) == 0 and distance[0] < 10.0, distance  # the first frame (the mp4 is lossy)
    with pytest.raises(openai.BadRequestError, match="variant 'spritesheet'"):
        sdk.videos.download_content(video.id, variant="spritesheet")


def test_retrieve_poll_and_remix(sdk):
    created = sdk.videos.create(prompt=PROMPT, extra_body={"seed": 5})
    strict(Video, created)
    assert created.status in ("queued", "in_progress") and created.progress in range(0, 101)
    strict(Video, sdk.videos.retrieve(created.id))
    done = sdk.videos.poll(created.id, poll_interval_ms=100)
    strict(Video, done)
    remix = sdk.videos.remix(done.id, prompt="a green circle moving down")
    strict(Video, remix)
    assert remix.remixed_from_video_id == done.id and remix.prompt == "a green circle moving down"
    remixed = sdk.videos.poll(remix.id, poll_interval_ms=100)
    assert remixed.status == "completed" and remixed.to_dict()["request"]["seed"] == 5  # the source's other values


def test_list_pages_through_every_job_in_both_orders(sdk):
    made = [sdk.videos.create(prompt=PROMPT, extra_body={"seed": i, "steps": 1}).id for i in range(3)]
    for job_id in made:
        sdk.videos.poll(job_id, poll_interval_ms=100)
    first = sdk.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.last_id == first.data[-1].id
    for v in first.data:
        strict(Video, v)
    newest = [v.id for v in sdk.videos.list(limit=2)]  # the SDK's auto-pagination follows after=last_id
    oldest = [v.id for v in sdk.videos.list(limit=2, order="asc")]
    assert set(made) <= set(newest) and newest == oldest[::-1] and len(newest) == len(set(newest))
    assert newest.index(made[2]) < newest.index(made[1]) < newest.index(made[0])


def test_delete_removes_a_job_for_every_reader(sdk, server):
    video = sdk.videos.create_and_poll(prompt=PROMPT, poll_interval_ms=100, extra_body={"steps": 1})
    gone = sdk.videos.delete(video.id)
    strict(VideoDeleteResponse, gone)
    assert (gone.id, gone.deleted, gone.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        sdk.videos.delete(video.id)
    assert not server.service.store.folder(video.id).exists()
    running = sdk.videos.create(prompt=PROMPT, extra_body={"steps": LONG})
    headers = {"Authorization": "Bearer test-key-1234"}
    assert wait_running(httpx.Client(base_url=server.url, headers=headers), running.id)["step"] >= 1
    queued = sdk.videos.create(prompt=PROMPT)
    for job in (queued, running):
        assert sdk.videos.delete(job.id).deleted
        with pytest.raises(openai.NotFoundError):
            sdk.videos.retrieve(job.id)
    assert not server.service.store.folder(queued.id).exists()
    sdk.videos.create_and_poll(prompt=PROMPT, poll_interval_ms=100, extra_body={"steps": 1})  # the worker went on
    assert not server.service.store.folder(running.id).exists()  # removed when it stopped at a step boundary


def test_a_cancelled_job_is_failed_with_code_cancelled(sdk, server):
    job = sdk.videos.create(prompt=PROMPT, extra_body={"steps": LONG})
    r = httpx.post(f"{server.url}/v1/videos/{job.id}/cancel", headers={"Authorization": "Bearer test-key-1234"})
    assert r.status_code in (200, 202), r.text
    done = sdk.videos.poll(job.id, poll_interval_ms=100)
    strict(Video, done)
    assert done.status == "failed" and done.error.code == "cancelled" and done.to_dict()["job_status"] == "cancelled"


def test_refusals_are_the_sdks_exceptions_with_one_line(sdk):
    cases = [
        (lambda: sdk.videos.create(prompt="a purple cat jumping"), openai.BadRequestError, "unknown word(s) purple, cat"),
        (lambda: sdk.videos.create(prompt=PROMPT, seconds="4"), openai.BadRequestError, "not a warm shape"),
        (lambda: sdk.videos.create(prompt=PROMPT, seconds="0.3"), openai.BadRequestError, "try '0.25' or '0.625'"),
        (lambda: sdk.videos.create(prompt=PROMPT, size="720x1280"), openai.BadRequestError, "not a warm shape"),
        (lambda: sdk.videos.create(prompt=PROMPT, model="sora-2"), openai.BadRequestError, "runs the toy pair"),
        (lambda: sdk.videos.create(prompt=PROMPT, input_reference=("ref.png", b"\x89PNG", "image/png")),
         openai.BadRequestError, "text only"),
        (lambda: sdk.videos.edit(prompt=PROMPT, video=("v.mp4", b"0" * 64, "video/mp4")), openai.BadRequestError,
         "editing a video is not supported"),
        (lambda: sdk.videos.extend(prompt=PROMPT, seconds="4", video=("v.mp4", b"0" * 64, "video/mp4")),
         openai.BadRequestError, "extending a video is not supported"),
        (lambda: sdk.videos.create_character(name="x", video=("v.mp4", b"0" * 64, "video/mp4")),
         openai.BadRequestError, "characters is not supported"),
        (lambda: sdk.videos.get_character("char_1"), openai.BadRequestError, "characters is not supported"),
        (lambda: sdk.videos.retrieve("video_" + "0" * 32), openai.NotFoundError, "no job"),
        (lambda: sdk.videos.remix("video_" + "0" * 32, prompt=PROMPT), openai.NotFoundError, "no job"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as caught:
            call()
        message = caught.value.body["message"]
        assert words in message and "\n" not in message, message


def test_the_async_client_too(server):
    async def run() -> tuple:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="test-key-1234", max_retries=0) as client:
            video = await client.videos.create_and_poll(prompt=PROMPT, poll_interval_ms=100, extra_body={"steps": 2})
            content = await client.videos.download_content(video.id)
            listed = [v.id async for v in client.videos.list(limit=1)]
            gone = await client.videos.delete(video.id)
            return video, content.read(), listed, gone

    video, mp4, listed, gone = asyncio.run(run())
    strict(Video, video)
    strict(VideoDeleteResponse, gone)
    assert video.status == "completed" and iio.imread(io.BytesIO(mp4), extension=".mp4").shape == (9, 32, 32, 3)
    assert video.id in listed and len(listed) == len(set(listed))


def test_the_key_is_required_when_set(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0000", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            wrong.videos.list()
    assert httpx.get(f"{server.url}/v1/videos").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes carry no key


def test_readmes_sdk_example_runs_against_a_server(tmp_path, monkeypatch):
    """README's OpenAI SDK block runs as written against a server: the only change is the address."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Serving"):]
    block = next(b for b in re.findall(r"^```py\n(.*?)^```", section, flags=re.S | re.M) if "from openai" in b)
    assert "http://127.0.0.1:8000/v1" in block
    server = ThreadedServer(toy_config(tmp_path / "results", queue_size=4))
    try:
        monkeypatch.chdir(tmp_path)
        exec(compile(block.replace("http://127.0.0.1:8000", server.url), "README.md SDK block", "exec"), {})
        assert iio.imread(tmp_path / "green-circle.mp4").shape == (9, 32, 32, 3)
        assert iio.imread(tmp_path / "green-circle.png").shape == (32, 32, 3)
        assert server.client.get("/v1/videos").json()["data"] == []  # the block deleted its video
    finally:
        server.stop()
