"""A server with compiled engines compiles in its warm-up, never in a user's request (issue 24): its
warm-up runs every engine once at the warm shape, whatever plan the warm-up job runs."""
from __future__ import annotations

import torch
from serve_support import ThreadedServer, toy_config, wait_final


def test_a_compiled_server_compiles_before_it_serves(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    config = toy_config(tmp_path / "results", compile="whole", plan="LLL")  # the warm-up job never runs S
    server = ThreadedServer(config, load=True)
    try:
        assert server.service.pipeline.load_seconds["compile"] > 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2  # both engines' step functions, compiled during the warm-up
        job = server.client.post("/v1/videos", json={"prompt": "a red circle moving left", "seed": 3,
                                                     "plan": "SSS"}).json()
        assert wait_final(server.client, job["id"])["status"] == "completed"
        assert counters["stats"]["unique_graphs"] == graphs  # the request compiled nothing
    finally:
        server.stop()
