"""resolve/resolved.py: one resolved request value for the CLI and the server, and its JSON round trip.

References: the CLI's parser for `flowblend generate`'s flags, the server's body schema for the same
values, and diffusers' WanPipeline rule for the expert switch (through the expert schedule, whose
per-step guidance must survive the round trip)."""
from __future__ import annotations

import json

import pytest

from flowblend.cli.common import check_groups, choices_of
from flowblend.cli.main import build_parser
from flowblend.families import get_family
from flowblend.resolve.blend_request import BlendChoices
from flowblend.resolve.resolved import ResolvedRequest, resolve_request
from flowblend.serve.config import ServeConfig
from flowblend.serve.video_request import VideoRequest, resolve


@pytest.mark.parametrize("pair, choices", [
    ("toy", BlendChoices(plan="LSL:0.4,0.2", steps=10)),
    ("wan22", BlendChoices(plan="experts:2,1", steps=12, guidance=5.0, guidance_2=2.5, frames=5, height=64, width=64)),
    ("ltx", BlendChoices(plan="L4,S2,L2", steps=8, frames=9, height=64, width=96)),  # dynamic shift: mu
    ("toy", BlendChoices(plan="LLllSSsLL", steps=9)),  # cached steps (issue 34)
])
def test_a_resolved_request_round_trips_through_json(pair, choices):
    family = get_family(pair)
    prompt = "a red circle moving left" if pair == "toy" else "a cat walking on grass"
    resolved = resolve_request(family, choices, prompt, "", seed=7)
    loaded = ResolvedRequest.from_json(json.loads(json.dumps(resolved.to_json())), family)
    assert loaded == resolved
    assert loaded.guidance_per_step == resolved.guidance_per_step
    if pair == "wan22":  # two scales: a table, and the switch step comes back with the experts
        assert set(resolved.guidance_per_step) == {5.0, 2.5} and loaded.experts.switch_step == resolved.experts.switch_step
    if pair == "ltx":
        assert loaded.request.mu is not None
    if choices.plan == "LLllSSsLL":
        assert loaded.request.plan.cached_steps() == (2, 3, 6) and resolved.to_json()["plan"]["per_step"] == "LLllSSsLL"


def test_a_value_of_one_family_is_not_loaded_for_another():
    resolved = resolve_request(get_family("toy"), BlendChoices(), "a red circle moving left")
    with pytest.raises(ValueError, match="a toy request cannot be loaded for the wan family"):
        ResolvedRequest.from_json(resolved.to_json(), get_family("wan"))


@pytest.mark.parametrize("pair, flags, body", [
    ("toy", ["--plan", "LSL:0.4,0.2", "--steps", "10", "--guidance", "3.5", "--seed", "3"],
     {"plan": "LSL:0.4,0.2", "steps": 10, "guidance": 3.5, "seed": 3}),
    ("wan22", ["--plan", "experts:2,1", "--steps", "12", "--guidance", "5", "--frames", "5", "--height", "64",
               "--width", "64", "--seed", "3"],
     {"plan": "experts:2,1", "steps": 12, "guidance": 5.0, "frames": 5, "size": "64x64", "seed": 3}),
])
def test_the_cli_and_the_server_hold_the_same_value(pair, flags, body, tmp_path):
    prompt = "a red circle moving left" if pair == "toy" else "a cat walking on grass"
    args = build_parser(("generate",)).parse_args(["generate", "--pair", pair, "--prompt", prompt, *flags])
    check_groups(args)
    from flowblend.cli.generate_cmd import resolved_of

    cli = resolved_of(args)
    server = resolve(VideoRequest(prompt=prompt, **body), ServeConfig(pair=pair, results_dir=str(tmp_path)),
                     get_family(pair))
    assert server.to_json() == cli.to_json()
    assert choices_of(args).plan == body["plan"]


class _Arrived(BaseException):
    """Raised by the recording stand-in once bench's cases would be built: nothing needs to run after that."""


def test_bench_holds_the_value_generate_resolves_for_the_same_flags(monkeypatch):
    """Each plan bench measures is one resolved request, equal (as JSON) to what `flowblend generate` resolves
    from the same flags; the reference plan (LLL) is measured too and resolved the same way."""
    from flowblend.bench import run as bench_run
    from flowblend.families import load_pair

    held = []

    def record(pair, eager, requests, *rest):
        held.extend(requests)
        raise _Arrived

    monkeypatch.setattr(bench_run, "_build_cases", record)
    options = bench_run.BenchOptions(backends=("torch",), plans=("LSL:0.4,0.2",), steps=10, guidance=3.5, repeats=1,
                                     warmup=0, overhead_repeats=0, progress=False)
    with pytest.raises(_Arrived):
        bench_run.run_bench(load_pair("toy"), options)
    from flowblend.cli.generate_cmd import resolved_of

    for plan in ("LLL", "LSL:0.4,0.2"):
        args = build_parser(("generate",)).parse_args(["generate", "--pair", "toy", "--prompt", bench_run.PROMPT,
                                                       "--plan", plan, "--steps", "10", "--guidance", "3.5"])
        check_groups(args)
        cli = resolved_of(args).to_json()
        assert [r.to_json() for r in held if r.plan.label == resolved_of(args).plan.label] == [cli], plan
    assert len(held) == 2
