"""The sampling modes of runtime/graph.py and how the commands spell them, defined once.

Kept free of torch so a command line can offer them as choices before anything heavy is imported.
`whole` captures the blended loop in one CUDA graph, `per_step` one graph per engine call (what
existing TensorRT diffusion pipelines capture), `eager` runs the plain loop.
"""

MODES = ("whole", "per_step", "eager")
GRAPH_FLAGS = {"whole": "whole", "per-step": "per_step", "none": "eager"}  # `flowblend generate --graph`
BENCH_MODES = {"loop": "eager", "step-graph": "per_step", "loop-graph": "whole"}  # `bench --mode`, report rows


def check_graph_flag(flag: str, device: str) -> str:
    """A `--graph` spelling that this device can run: CUDA graphs need a CUDA device (generate and serve)."""
    from flowblend.errors import FlowblendError

    if flag not in GRAPH_FLAGS:
        raise FlowblendError(f"unknown --graph {flag!r}: choose one of {', '.join(GRAPH_FLAGS)}")
    if flag != "none" and not str(device).startswith("cuda"):
        raise FlowblendError(f"--graph {flag} captures CUDA graphs: pass --device cuda, or drop --graph")
    return flag
