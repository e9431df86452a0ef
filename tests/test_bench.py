"""`flowblend bench` and its parts: outputs and their relations, error paths, memory tracking, the GPU script's dry run.

Speed is never asserted: only what must hold whatever the machine (fields, ratios computed from the
same measurements, FLOP ordering, memory terms against independently computed sizes).
"""
import importlib.util
import json
import statistics
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from fake_cuda_graph import FakeGraphBackend

from flowblend.bench.memory import LiveTensorBytes
from flowblend.bench.pairing import round_order
from flowblend.bench.report import render_markdown
from flowblend.bench.run import BenchOptions, run_bench
from flowblend.bench.runtime_cost import measure_overhead
from flowblend.bench.tiny import TEXT, WAN_LATENT, tiny_pair
from flowblend.cli.main import main
from flowblend.engines.signature import signature_for
from flowblend.families import load_pair
from flowblend.families.toy_model import TOY_LARGE_CONFIG, TOY_SMALL_CONFIG, build_toy_transformer
from flowblend.runtime.plan import BlendPlan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
FAST = ["--steps", str(STEPS), "--repeats", "1", "--warmup", "1", "--overhead-repeats", "1", "--no-progress"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--pair", "toy", "--backend", "torch", "--backend", "tensorrt", "--out", str(out)] + FAST)
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_bench_writes_json_markdown_and_png(toy_bench):
    out, report = toy_bench
    assert {"machine", "pair", "options", "flops", "cases", "skipped", "memory", "overhead", "targets", "command"} <= set(report)
    png = iio.imread(out / "bench.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
    md = (out / "bench.md").read_text()
    for row in report["cases"]:
        assert f"| {row['backend']} | {row['mode']} | {row['plan']} | {row['stages']} |" in md
    assert "### Targets" in md and report["machine"]["cpu"] in md
    assert report["command"].startswith("flowblend bench --pair toy")


def test_bench_relations_hold(toy_bench):
    _, report = toy_bench
    rows = {r["plan"]: r for r in report["cases"] if r["backend"] == "torch"}
    lll, lsl, sss = rows["LLL"], rows["LSL:0.4,0.2"], rows["SSS"]
    assert lll["flops"] > lsl["flops"] > sss["flops"] > 0
    assert lll["reference"] and lll["speedup_loop"] == pytest.approx(1.0) and lll["speedup_e2e"] == pytest.approx(1.0)
    assert lll["ideal_speedup"] == pytest.approx(1.0) and sss["ideal_speedup"] > lsl["ideal_speedup"] > 1.0
    for r in report["cases"]:
        assert r["loop_s"]["min"] <= r["loop_s"]["median"] <= r["loop_s"]["max"]
        assert r["e2e_s"]["median"] >= r["loop_s"]["median"] > 0
        assert r["realized_fraction"] == pytest.approx(r["speedup_loop"] / r["ideal_speedup"])
        plan = BlendPlan.parse(r["plan"], STEPS)
        for model in ("large", "small"):  # the per-step pass timed every engine call the plan makes
            assert r["step_ms"].get(model, {"n": 0})["n"] == plan.count(model) * report["options"]["repeats"]
        assert 0 < r["engine_share"] <= 1
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "CUDA" in skipped["tensorrt"]


def test_bench_memory_terms_against_model_sizes(toy_bench):
    _, report = toy_bench
    mem = report["memory"]
    for size in ("large", "small"):  # weights: parameters and buffers of a freshly built toy model, in fp32
        model = build_toy_transformer(size)
        expected = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        assert mem["weights_bytes"][size] == expected
    latent = report["pair"]["latent_shape"]
    latent_bytes = 4 * torch.Size(latent).numel()
    assert mem["shared_buffers_bytes"] >= 3 * latent_bytes  # latents, CFG model input and velocity at least
    # engine constants: Wan's rotary tables [1, tokens, 1, head_dim] x2 and, per step, temb [B, dim] and its
    # modulation projection [B, 6, dim], all float32, for the steps of the blended plan
    steps, batch = report["pair"]["steps"], 2
    tokens = torch.Size(latent[1:]).numel() // (3 * 4 * 4)
    for size, config in (("large", TOY_LARGE_CONFIG), ("small", TOY_SMALL_CONFIG)):
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        expected = 4 * (2 * tokens * config["attention_head_dim"] + steps * batch * 7 * dim)
        assert mem["engine_constants_bytes"][size] == expected, size
    assert mem["bound_bytes"] == sum(mem["weights_bytes"].values()) + sum(mem["engine_constants_bytes"].values()) \
        + mem["large_activations_bytes"] + mem["shared_buffers_bytes"]
    assert mem["large_activations_bytes"] > 0 and isinstance(mem["met"], bool)
    names = [t["name"] for t in report["targets"]]
    assert any("LSL" in n for n in names) and any("overhead" in n for n in names) and any("memory" in n for n in names)


def test_readme_section_renders_from_the_json(toy_bench, tmp_path):
    out, report = toy_bench
    rc = load_script("bench_readme").main(["--json", str(out / "bench.json"), "--out", str(tmp_path / "b.md")])
    text = (tmp_path / "b.md").read_text()
    assert rc == 0 and report["command"] in text and report["machine"]["torch"] in text and "load average" in text
    assert load_script("bench_readme").main(["--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.md")]) == 2
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- bench:start -->\nstale numbers\n<!-- bench:end -->\nafter\n")
    args = ["--json", str(out / "bench.json"), "--out", str(tmp_path / "d.md"), "--readme", str(readme)]
    assert load_script("bench_readme").main(args) == 0
    spliced = readme.read_text()
    assert "stale numbers" not in spliced and text.strip() in spliced
    assert spliced.startswith("# x\nbefore\n<!-- bench:start -->\n") and spliced.endswith("<!-- bench:end -->\nafter\n")
    readme.write_text("no markers\n")
    assert load_script("bench_readme").main(args) == 2 and readme.read_text() == "no markers\n"


@pytest.mark.parametrize("extra, message", [
    (["--backend", "cuda-magic"], "unknown backend"),
    (["--mode", "graph"], "unknown mode"),
    (["--plan-file", "no/such/plan.json"], "does not exist"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--frames", "0"], "frames must be"),
])
def test_bench_bad_input_is_a_one_line_error(tmp_path, capsys, extra, message):
    rc = main(["bench", "--out", str(tmp_path / "o")] + FAST + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_cuda_without_gpu(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)] + FAST) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_plan_file_is_benchmarked_and_step_mismatch_refused(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(BlendPlan.from_steps("LS").to_json())
    rc = main(["bench", "--backend", "torch", "--plan-file", str(plan), "--out", str(tmp_path / "o")] + FAST[:-3]
              + ["--overhead-repeats", "0", "--no-progress"])
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert rc == 0 and [r["stages"] for r in report["cases"]] == ["L2", "L1,S1"]  # LLL reference added
    rc = main(["bench", "--plan-file", str(plan), "--steps", "3", "--out", str(tmp_path / "p"), "--no-progress"])
    assert rc == 2 and "pass --steps 2" in capsys.readouterr().err


def test_compile_failure_is_reported_not_fatal(monkeypatch):
    def broken(*args, **kwargs):  # what torch.compile returns: it fails on its first call, as inductor would
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    options = BenchOptions(backends=("torch", "torch-compile"), plans=("LLL",), steps=STEPS, repeats=1,
                           overhead_repeats=0, progress=False)
    report = run_bench(load_pair("toy"), options)
    assert {r["backend"] for r in report["cases"]} == {"torch"}
    reason = next(s["reason"] for s in report["skipped"] if s["backend"] == "torch-compile")
    assert "RuntimeError: inductor exploded" in reason


def test_runtime_and_bare_loop_compute_the_same_latents():
    modules = {m: signature_for(module) for m, module in tiny_pair("wan").items()}
    result = measure_overhead(modules, BlendPlan.parse("LSL", 5), {"solver": "unipc", "shift": 3.0}, 4.0,
                              WAN_LATENT, TEXT, 2, torch.device("cpu"), "tiny Wan")
    assert result["max_abs_diff_vs_bare"] < 1e-4
    assert result["bare_loop_ms"] > 0 and result["runtime_loop_ms"] > 0 and result["repeats"] == 2
    # the default engines (schedule constants split out) are timed too and compute the same latents
    assert result["split_constants"] and result["runtime_split_loop_ms"] > 0
    assert result["split_max_abs_diff_vs_bare"] < 1e-4


def test_live_tensor_bytes_counts_new_storages_only():
    a = torch.randn(100, 100)  # 40,000 bytes, made before the region: never counted
    with torch.no_grad(), LiveTensorBytes() as live:
        b = a @ a             # +40,000
        c = b @ b             # +40,000 -> 80,000 live
        del b                 # -40,000
        a.add_(1.0)           # in place on an outside storage: nothing new
        d = torch.empty(50, 100)  # +20,000 -> 60,000 live
        view = c[:10]         # a view: same storage
    assert live.peak == 80_000 and live.current == 60_000
    del c, d, view


def test_gpu_script_dry_run_and_argument_checks(tmp_path, capsys):
    script = load_script("gpu_bench")
    assert script.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["model_depth"] == {"large": "2 of 2 layers", "small": "1 of 1 layers"}
    assert {r["stages"] for r in report["cases"]} == {"L3", "L1,S1,L1"}
    assert {s["mode"] for s in report["skipped"]} == {"step-graph", "loop-graph"}  # need CUDA
    assert (tmp_path / "gpu-bench.md").is_file() and (tmp_path / "gpu-bench.png").is_file()
    assert script.main(["--dry-run", "--layers-large", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--layers-large must be between 1 and 2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--out", str(tmp_path / "y")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_machine_state_counts_only_load_above_the_benchmarks_own_threads():
    state = load_script("bench_readme").machine_state
    machine = {"cores": 2, "torch_threads": 2}
    assert "no sign of other work" in state({"machine": machine, "load_average": {"start": [0.9], "end": [1.97]}})
    assert "other processes were running" in state({"machine": machine, "load_average": {"start": [0.1], "end": [3.2]}})
    single = {"cores": 2, "torch_threads": 1}
    assert "other processes were running" in state({"machine": single, "load_average": {"start": [0], "end": [1.9]}})


def test_paired_speedup_cancels_drift_common_to_a_round():
    from flowblend.bench.pairing import paired_speedup

    # the machine runs at 1x, 2x and 1.2x slowness in three rounds; the case is 2x faster in two of them
    reference, case = [1.0, 2.0, 1.2], [0.5, 1.0, 0.8]
    assert paired_speedup(reference, case) == pytest.approx(2.0)  # ratios 2, 2, 1.5
    assert statistics.median(reference) / statistics.median(case) == pytest.approx(1.5)  # what drift does to medians
    with pytest.raises(ValueError, match="differ in number"):
        paired_speedup(reference, case[:2])


def test_realized_spread_is_the_quartiles_of_the_rounds():
    from flowblend.bench.report import _quartiles

    assert _quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == [1.5, 4.5]  # statistics' default (exclusive) method
    assert _quartiles([1.0]) is None


def test_readme_lists_the_lsl_figure_of_every_run():
    def report(measured):
        return {"targets": [{"name": "LSL realized speedup / FLOP-ideal (eager, loop)", "measured": f"{measured} (x)"}]}

    text = load_script("bench_readme").repeat_runs(report("97.4%"), [("a.json", report("94.3%")), ("b.json", report("95.9%")),
                                                                     ("c.json", report("95.6%"))])
    assert "94.3% (`a.json`)" in text and "Median of all 4: 95.8%" in text and "range 94.3-97.4%" in text
    assert "met in 3 of 4" in text
    assert load_script("bench_readme").repeat_runs(report("97.4%"), []) == ""


def test_readme_reads_the_lsl_figure_from_its_number():
    def report(value):  # the display text is deliberately wrong: the number must win
        return {"targets": [{"name": "LSL realized speedup / FLOP-ideal (eager, loop)", "measured": "50.0% (x)",
                             "value": value}]}

    text = load_script("bench_readme").repeat_runs(report(0.9612), [("a.json", report(0.9488))])
    assert "measured 96.1%" in text and "94.9% (`a.json`)" in text and "met in 1 of 2" in text


class CountingGraphBackend(FakeGraphBackend):
    """tests/fake_cuda_graph.py's stand-in (replays only what was recorded while capturing), counting calls."""

    def __init__(self):
        super().__init__()
        self.captures, self.replays = [], 0

    def begin_capture(self, body=None):
        graph = super().begin_capture(body)
        self.captures.append(graph)
        return graph

    def discard_stream(self):
        pass

    def replay(self, graph):
        self.replays += 1
        super().replay(graph)


def test_graph_modes_run_through_the_graph_runner(monkeypatch):
    """On CPU with the recording graph stand-in: graph cases capture once, replay per run, match the eager loop."""
    import flowblend.bench.run as bench

    backends = []
    monkeypatch.setattr(bench, "_check_mode", lambda mode, device: None)  # the real one asks for a CUDA device
    from flowblend.runtime.graph import GraphRunner

    def runner_with_stand_in(sampler, mode):  # the assembly's runner_for, over the recording stand-in
        backends.append(CountingGraphBackend())
        return GraphRunner(sampler, mode, backend=backends[-1])

    monkeypatch.setattr(bench, "runner_for", runner_with_stand_in)
    pair = load_pair("toy")
    options = BenchOptions(backends=("torch",), modes=("loop", "step-graph", "loop-graph"), plans=("LLL", "LSL:0.4,0.2"),
                           steps=5, warmup=1, repeats=2, overhead_repeats=0, progress=False)
    report = run_bench(pair, options)
    graph_rows = [r for r in report["cases"] if r["mode"] != "loop"]
    assert {(r["mode"], r["plan"]) for r in graph_rows} == {(m, p) for m in ("step-graph", "loop-graph")
                                                             for p in ("LLL", "LSL:0.4,0.2")}
    for r in graph_rows:
        assert r["max_abs_diff_vs_loop"] <= 1e-6 and r["engine_share"] is None and r["step_ms"] == {}
    # four runners in case order (step-graph LLL, LSL, loop-graph LLL, LSL); 5 steps; 1 warm-up + 2 timed runs
    assert [len(b.captures) for b in backends] == [5, 5, 1, 1]
    assert [b.replays for b in backends] == [15, 15, 3, 3]
    assert "Graph replays against the eager loop" in render_markdown(report)


def test_readme_refuses_a_missing_repeat_json(toy_bench, tmp_path, capsys):
    out, _ = toy_bench
    args = ["--json", str(out / "bench.json"), "--out", str(tmp_path / "e.md"), "--repeat-json", str(tmp_path / "nope.json")]
    assert load_script("bench_readme").main(args) == 2 and not (tmp_path / "e.md").exists()
    assert "--repeat-json" in capsys.readouterr().err


def test_rounds_rotate_which_case_goes_first():
    cases = ["LLL", "LSL", "SSS"]
    rounds = [round_order(cases, r) for r in range(6)]
    assert [r[0] for r in rounds] == ["LLL", "LSL", "SSS", "LLL", "LSL", "SSS"]
    assert all(sorted(r) == sorted(cases) for r in rounds) and round_order([], 3) == []


def test_pooled_realized_takes_every_runs_rounds():
    def report(lll, lsl):
        return {"cases": [{"backend": "torch", "mode": "loop", "plan": "LLL", "reference": True, "loop_rounds_s": lll},
                          {"backend": "torch", "mode": "loop", "plan": "LSL:0.4,0.2", "reference": False,
                           "ideal_speedup": 1.5, "loop_rounds_s": lsl}],
                "targets": [{"name": "LSL realized speedup / FLOP-ideal (eager, loop)", "measured": "x", "value": 0.9}]}

    # per-round ratios / 1.5: run a 0.90, 1.00, 0.80; run b 0.96, 0.96 -> pooled median 0.96 of 5 rounds
    a, b = report([1.35, 1.5, 1.2], [1.0, 1.0, 1.0]), report([1.44, 2.88], [1.0, 2.0])
    pooled = load_script("bench_readme").pooled_realized([a, b])
    assert pooled["rounds"] == 5 and pooled["median"] == pytest.approx(0.96)
    assert pooled["low"] <= pooled["median"] <= pooled["high"] and pooled["low"] >= 0.8 - 1e-9 and pooled["high"] <= 1.0 + 1e-9
    text = load_script("bench_readme").repeat_runs(a, [("b.json", b)])
    assert "Pooling the 5 paired rounds of all 2 runs: median 96.0%" in text
    del a["cases"][1]["loop_rounds_s"]  # reports from before the per-round times: no pooled figure
    assert load_script("bench_readme").pooled_realized([a, b]) is None
