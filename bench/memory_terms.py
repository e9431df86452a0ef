"""Each term of a benchmark run's memory bound predicted from its own source, to hold against what a GPU run
recorded (docs/gpu-runs/*/runner-report/bench/gpu-bench.json), never from that run's figures (issue 35, item 6).

A prediction reads only the run's settings (`RunSettings.of(report)`: pair, shape, steps, solver, depth, dtype,
compute capability); `measured_terms(report["memory"])` splits what the run measured into the same terms.

| term             | predicted from                                                                          |
|------------------|-----------------------------------------------------------------------------------------|
| weights          | the family's model built on the meta device at the run's config, held as the run held   |
|                  | it (`RunSettings.cast`): random weights (bench/fullsize.random_transformer) have every  |
|                  | parameter in the run's dtype; the engine factory of that run cast the buffers too (RoPE |
|                  | tables: engines/factory.py until f0a6aa0), today's keeps them as the model makes them   |
| engine constants | the family's split step (families/wan_step.py) computing its constants on the meta      |
|                  | device at the run's binding (rotary tables, per-step timestep embeddings)               |
| shared buffers   | runtime/buffers.py SamplerBuffers allocated on the CPU at the run's shapes              |
| activations      | the split step's forward on the meta device, the storages it creates counted while      |
|                  | alive (bench/memory_plan.py; SDPA as its output: cuDNN/flash keep no score matrix)       |
| held before      | what bench/run.py keeps alive beside the sampler (the noise in FP32, the two prompt      |
|                  | embeddings in the run's dtype) + the default stream's BLAS workspace                    |
| stream workspace | the BLAS workspace of the loop's own stream (bench/memory.py blas_workspace_bytes:      |
|                  | cuBLAS's documented sizes and PyTorch's CUBLAS_WORKSPACE_CONFIG rule)                    |
"""
from __future__ import annotations

from dataclasses import dataclass

TERMS = ("weights", "engine_constants", "shared_buffers", "activations", "held_before", "stream_workspace")


@dataclass(frozen=True)
class RunSettings:
    """What a benchmark run was asked to do: all a prediction may read."""

    family: str
    layers: dict          # model -> blocks run (gpu_bench --layers-large/--layers-small)
    latent_shape: tuple
    steps: int
    solver: str
    shift: float
    cfg_rows: int         # rows of the largest forward: 2 with CFG batched (bench's engines)
    dtype: str            # precision name (engines/kinds.py)
    capability: tuple[int, int] | None
    cast: bool = True     # every floating tensor in `dtype` (the engines' .to(dtype) before f0a6aa0), or buffers as made

    @classmethod
    def of(cls, report: dict) -> "RunSettings":
        """The settings of a gpu_bench report, read from its pair, options, machine and model_depth sections."""
        pair, machine = report["pair"], report["machine"]
        names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
        dtype = report["options"].get("dtype", "float32")
        capability = machine.get("capability")
        return cls(pair["name"], {m: int(d.split(" of ")[0]) for m, d in report["model_depth"].items()},
                   tuple(pair["latent_shape"]), int(pair["steps"]), pair["solver"], float(pair["shift"]),
                   2 if float(pair["guidance"]) > 1 else 1, names.get(dtype, dtype),
                   tuple(int(p) for p in capability.split(".")) if capability else None,
                   report.get("weights_layout", "cast") == "cast")  # schema-1 reports before the key: cast


def _configs(settings: RunSettings) -> dict:
    from ..families import get_family

    family = get_family(settings.family)
    return {m: dict(c, num_layers=settings.layers.get(m, c["num_layers"])) for m, c in family.reference_configs.items()}


def _held_as_run(family, config: dict, torch_dtype, cast: bool):
    """The meta model with every parameter in `torch_dtype`, and its buffers too if `cast` (else as constructed)."""
    import torch

    from .memory_plan import _meta_model

    model = _meta_model(family, config)
    if cast:
        return torch.nn.Module.to(model, torch_dtype)  # diffusers' .to warns of its FP32 islands: cast on purpose
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.to(torch_dtype), requires_grad=False))
    return model


def _bound(family, settings: RunSettings, torch_dtype, timesteps: int) -> dict:
    import torch

    from ..engines.base import LATENTS, TEXT_EMBEDS, TIMESTEP

    rows = settings.cfg_rows
    return {LATENTS: torch.empty(rows, *settings.latent_shape, dtype=torch_dtype, device="meta"),
            TIMESTEP: torch.empty(timesteps, rows, device="meta"),
            TEXT_EMBEDS: torch.empty(rows, family.text_len, family.text_dim, dtype=torch_dtype, device="meta")}


def predicted_terms(settings: RunSettings, largest: str | None = None) -> dict[str, int]:
    """{term: bytes} of a bench run's memory bound (bench/runtime_cost.memory_budget), each from its source."""
    import torch

    from ..engines.kinds import precision
    from ..engines.signature import signature_for, step_split_for
    from ..families import get_family
    from ..runtime.solvers import make_solver_table
    from .memory import blas_workspace_bytes
    from .memory_plan import planned_buffer_bytes
    from .meta_count import FusedAttention as _FusedAttention
    from .meta_count import LiveStorages as _LiveStorages

    family = get_family(settings.family)
    largest = largest or family.models[0]
    torch_dtype = precision(settings.dtype).torch_dtype
    element = torch.empty((), dtype=torch_dtype).element_size()
    table = make_solver_table(settings.solver, settings.steps, settings.shift)
    configs = _configs(settings)
    weights = constants = activations = 0
    with torch.no_grad():
        for m in family.models:
            model = _held_as_run(family, configs[m], torch_dtype, settings.cast)
            weights += sum(p.numel() * element for p in model.parameters())
            weights += sum(b.numel() * b.element_size() for b in model.buffers())
            split = step_split_for(model, signature_for(model))
            bound = _bound(family, settings, torch_dtype, len(table.timesteps))
            step_constants = split.constants(bound)
            constants += step_constants.nbytes()
            if m == largest:
                with _FusedAttention(), _LiveStorages() as live:
                    split(bound, step_constants, 0)
                activations = live.peak
    cfg = settings.cfg_rows == 2
    buffers = planned_buffer_bytes(settings.latent_shape, (family.text_len, family.text_dim), table.timesteps, cfg,
                                   settings.dtype, table.state_names, family.takes_text_mask)
    latent_elements = 1
    for size in settings.latent_shape:
        latent_elements *= size
    caller = 4 * latent_elements + 2 * family.text_len * family.text_dim * element  # FP32 noise, 2 prompt rows
    workspace = blas_workspace_bytes(settings.capability, environ={})
    return {"weights": weights, "engine_constants": constants, "shared_buffers": buffers, "activations": activations,
            "held_before": caller + workspace, "stream_workspace": workspace}


def measured_terms(memory: dict) -> dict[str, int]:
    """The same terms from what a run measured: its storages, its start of the loop and its peaks.

    held before = allocated when the loop began - weights - constants - buffers; stream workspace = the loop's
    peak - that start - the large forward's activations (what the loop added beyond one forward)."""
    weights, constants = sum(memory["weights_bytes"].values()), sum(memory["engine_constants_bytes"].values())
    start = memory["blended"]["allocated_start_bytes"]
    return {"weights": weights, "engine_constants": constants, "shared_buffers": memory["shared_buffers_bytes"],
            "activations": memory["large_activations_bytes"],
            "held_before": start - weights - constants - memory["shared_buffers_bytes"],
            "stream_workspace": memory["measured_bytes"] - start - memory["large_activations_bytes"]}

