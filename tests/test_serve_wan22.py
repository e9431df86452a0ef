"""`flowblend serve --pair wan22`: the HTTP API over the two Wan 2.2 experts and the small model.

The server is configured from `flowblend serve`'s own flags (parsed by the CLI's parser) on the tiny
wan22 checkpoints of tests/test_cli_wan22.py, with its text encoder / VAE stand-ins, and loads and warms
up itself (uvicorn on a free 127.0.0.1 port, in a thread, stopped by the test). References: the expert
switch step from diffusers' own UniPC timesteps (test_cli_wan22's SWITCH), the video `flowblend generate`
writes for the same values, and the CLI's error line for the same bad plan.
"""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import test_cli_wan22 as wan22
from serve_support import ThreadedServer, wait_final

from flowblend.cli.common import check_groups
from flowblend.cli.main import build_parser
from flowblend.cli.main import main as cli_main
from flowblend.cli.serve_cmd import config_from_args

checkpoints, fake_shared = wan22.checkpoints, wan22.fake_shared  # the tiny A14B + 1.3B and the stand-ins
STEPS, SWITCH, VIDEO = wan22.STEPS, wan22.SWITCH, wan22.VIDEO
PROMPT = "a cat walking on grass"
GUIDANCE, GUIDANCE_2 = 5.0, 2.5


@pytest.fixture
def server(checkpoints, fake_shared, tmp_path):
    root, _ = checkpoints
    args = build_parser(("serve",)).parse_args(
        ["serve", *wan22.ckpt_args(root), "--steps", str(STEPS), *VIDEO, "--guidance-2", str(GUIDANCE_2),
         "--results-dir", str(tmp_path / "results"), "--threads", "1", "--queue-size", "2"])
    check_groups(args)
    s = ThreadedServer(config_from_args(args), load=True)  # loads the three models and warms up, as serve does
    yield s
    s.stop()


def test_expert_plans_run_with_the_family_names_and_per_step_guidance(server, checkpoints, tmp_path, monkeypatch):
    assert SWITCH == 4 and STEPS == 6  # the experts:1,1 plan below then has every model on some step
    client = server.client
    default = wait_final(client, client.post("/v1/videos", json={"prompt": PROMPT}).json()["id"])
    assert default["status"] == "completed", default
    assert default["models"] == ["high"] * SWITCH + ["low"] * (STEPS - SWITCH)  # the family's plan: experts
    assert default["request"]["plan"]["spec"] == "experts"

    r = client.post("/v1/videos", json={"prompt": PROMPT, "plan": "experts:1,1", "guidance": GUIDANCE, "seed": 7})
    assert r.status_code == 202, r.text
    expected = ["high"] * (SWITCH - 1) + ["small", "small"] + ["low"] * (STEPS - SWITCH - 1)
    assert r.json()["models"] == expected
    done = wait_final(client, r.json()["id"])
    assert done["status"] == "completed", done
    assert (done["step"], done["steps"], done["models"], done["step_model"]) == (STEPS, STEPS, expected, "low")
    assert set(done["timings"]["step_seconds_mean"]) == {"high", "low", "small"}
    request = done["request"]
    assert (request["boundary_ratio"], request["expert_switch_step"]) == (0.875, SWITCH)
    # the request's guidance is the high-noise expert's (generate's --guidance), --guidance-2 the low one's;
    # the small model takes the scale of the expert whose step it runs
    assert request["guidance_per_step"] == [GUIDANCE] * SWITCH + [GUIDANCE_2] * (STEPS - SWITCH)

    # the same values through `flowblend generate` give the same video
    root, _ = checkpoints
    out = tmp_path / "generate.mp4"
    monkeypatch.chdir(tmp_path)
    assert cli_main(["generate", *wan22.ckpt_args(root), "--plan", "experts:1,1", "--steps", str(STEPS), *VIDEO,
                     "--guidance", str(GUIDANCE), "--guidance-2", str(GUIDANCE_2), "--seed", "7", "--prompt", PROMPT,
                     "--out", str(out), "--no-progress"]) == 0
    served = iio.imread(server.service.store.folder(done["id"]) / done["video"], index=None).astype(int)
    generated = iio.imread(out, index=None).astype(int)
    assert served.shape == generated.shape and np.abs(served - generated).max() <= 1
    other = wait_final(client, client.post("/v1/videos", json={"prompt": PROMPT, "plan": "experts:1,1",
                                                                "guidance": 1.5, "seed": 7}).json()["id"])
    other_video = iio.imread(server.service.store.folder(other["id"]) / other["video"], index=None).astype(int)
    assert np.abs(other_video - generated).max() > 1  # the request's guidance reaches the sampler


@pytest.mark.parametrize("plan", ["H3,B3", "experts:5,0"])
def test_wan22_plan_refusals_are_the_cli_lines(server, capsys, tmp_path, monkeypatch, plan):
    """B is no model of wan22 (H high, L low, S small); only SWITCH steps come before the expert switch."""
    r = server.client.post("/v1/videos", json={"prompt": PROMPT, "plan": plan})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", "--pair", "wan22", "--plan", plan, "--steps", str(STEPS), *VIDEO]) == 2
    cli_line = capsys.readouterr().err.strip().split("error: ", 1)[1]
    assert cli_line in message
    assert ("B3" if plan == "H3,B3" else f"at most experts:{SWITCH},0") in message
