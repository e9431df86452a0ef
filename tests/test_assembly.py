"""The one assembly of a run (assembly/) holds generate, the server and bench to the same wiring.

Two drifts the three hand-wired copies had (issue 23), each caught here:
- a server with `--backend onnxruntime` loaded the PyTorch transformers the engines never run (at Wan
  14B + 1.3B about 31 GB of device memory): counted here as instances of diffusers' WanTransformer3DModel;
- `--compile-mode` reached bench only: every engine option (`EngineChoice`'s fields) is given to each
  caller in its own spelling and must arrive, unchanged, at the engine factory.
"""
from __future__ import annotations

import functools

import pytest
from serve_support import ThreadedServer, wait_final

from flowblend.assembly import ENGINE_OPTIONS, EngineChoice
from flowblend.cli.common import check_groups
from flowblend.cli.main import build_parser, main
from flowblend.cli.serve_cmd import config_from_args
from flowblend.engines import factory

PROMPT = "a red circle moving left"


class Arrived(BaseException):
    """Raised by the recording factory once the engine options arrived: nothing needs to run after that."""


@pytest.fixture
def wan_instances(monkeypatch):
    """How many diffusers WanTransformer3DModel objects (the toy pair's class) are created from here on."""
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    created = []
    original = WanTransformer3DModel.__init__

    @functools.wraps(original)  # diffusers reads the config fields from __init__'s signature
    def counting_init(self, *args, **kwargs):
        created.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "__init__", counting_init)
    return created


@pytest.fixture(scope="module")
def toy_onnx_engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    assert main(["export", "--pair", "toy", "--artifacts", str(root), "--no-progress", "--no-verify"]) == 0
    assert main(["build", "--pair", "toy", "--backend", "onnxruntime", "--artifacts", str(root), "--no-progress"]) == 0
    return root


def test_an_onnxruntime_server_never_creates_the_pytorch_transformers(toy_onnx_engines, wan_instances, tmp_path):
    args = build_parser(("serve",)).parse_args(
        ["serve", "--pair", "toy", "--backend", "onnxruntime", "--artifacts", str(toy_onnx_engines), "--steps", "4",
         "--results-dir", str(tmp_path / "results"), "--threads", "1", "--queue-size", "2"])
    check_groups(args)
    server = ThreadedServer(config_from_args(args), load=True)  # loads, makes engines and warms up as serve does
    try:
        job = server.client.post("/v1/videos", json={"prompt": PROMPT, "seed": 1}).json()
        assert wait_final(server.client, job["id"])["status"] == "completed"
    finally:
        server.stop()
    assert wan_instances == [], f"the onnxruntime server created PyTorch transformers: {wan_instances}"

    from flowblend.assembly import load_models

    load_models("toy", EngineChoice(backend="torch"))  # the count sees them where they are loaded
    assert wan_instances == ["WanTransformer3DModel"] * 2


# One value per engine option, none of them the default, in each caller's own spelling (its flags).
CHOSEN = {"backend": "torch-compile", "device": "cpu", "dtype": "bf16", "artifacts": None,
          "compile_mode": "max-autotune-no-cudagraphs", "compile": "regional", "attention": "math",
          "fp8_keep_blocks": 1, "cfg": "sequential"}
# Engine options that do not reach the factory from a single-process CPU run, each tested where it acts:
# offload is taken by load_models (tests/test_offload.py); parallel and parallel_timeout need a torchrun world
# and are refused without one (tests/test_parallel.py spawns the ranks).
NOT_AT_THE_FACTORY = {"offload", "parallel", "parallel_timeout"}


def _flags(choice: dict) -> list[str]:
    return [part for name, value in choice.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def _generate(flags, tmp_path):
    main(["generate", "--pair", "toy", "--steps", "2", "--prompt", PROMPT, "--out", str(tmp_path / "v.gif"),
          "--no-progress", *flags])


def _serve(flags, tmp_path):
    from flowblend.families import get_family
    from flowblend.serve.service import VideoService
    from flowblend.serve.warm import WarmPipeline

    args = build_parser(("serve",)).parse_args(["serve", "--pair", "toy", "--steps", "2", "--results-dir",
                                                str(tmp_path / "results"), *flags])
    check_groups(args)
    config = config_from_args(args)
    WarmPipeline(config, get_family("toy")).load(VideoService.check_config(config), warm_up=False)


def _bench(flags, tmp_path):
    main(["bench", "--pair", "toy", "--steps", "2", "--plan", "LLL", "--repeats", "1", "--warmup", "1",
          "--overhead-repeats", "0", "--no-progress", "--out", str(tmp_path / "bench"), *flags])


@pytest.mark.parametrize("caller", [_generate, _serve, _bench], ids=["generate", "serve", "bench"])
def test_every_engine_option_reaches_the_engine_factory_from_every_caller(caller, tmp_path, monkeypatch):
    assert set(CHOSEN) | NOT_AT_THE_FACTORY == set(ENGINE_OPTIONS), "give every EngineChoice field a value here"
    chosen = {**CHOSEN, "artifacts": str(tmp_path / "my-artifacts")}
    defaults = EngineChoice().to_dict()
    assert all(chosen[k] != defaults[k] for k in chosen if k != "device"), "cpu is the only device here"
    arrived = []
    real = factory.make_engines

    def recording(backend, pair, **kwargs):
        if backend != chosen["backend"]:
            return real(backend, pair, **kwargs)  # bench's eager reference, always measured
        arrived.append({"backend": backend, **{k: kwargs[k] for k in CHOSEN if k != "backend"}})
        raise Arrived

    monkeypatch.setattr(factory, "make_engines", recording)
    with pytest.raises(Arrived):
        caller(_flags(chosen), tmp_path)
    assert arrived == [chosen]


def test_an_engine_choice_refuses_an_unknown_backend_or_dtype():
    from flowblend.errors import FlowblendError

    with pytest.raises(FlowblendError, match="unknown backend 'tensorflow': choose one of torch"):
        EngineChoice(backend="tensorflow")
    with pytest.raises(FlowblendError, match="unknown dtype 'fp64'"):
        EngineChoice(dtype="fp64")
    with pytest.raises(FlowblendError, match="unknown --attention 'sage': choose one of auto, cudnn"):
        EngineChoice(attention="sage")  # the Python API's way in; the CLI's choices refuse it before
    with pytest.raises(FlowblendError, match="--fp8-keep-blocks must be >= 0, got -2"):
        EngineChoice(dtype="fp8", fp8_keep_blocks=-2)
    with pytest.raises(FlowblendError, match="unknown compile option 'most'"):
        EngineChoice(compile="most")
