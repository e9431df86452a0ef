"""Which engines a run uses and how they are made: the one declaration of the engine settings.

generate, serve, bench and the pipelines all hand an `EngineChoice` to the run's assembly
(assembly/run.py); its fields are the engine options. Kept free of torch: flag parsing reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flowblend.errors import FlowblendError
from flowblend.settings import setting

from ..engines import factory
from ..engines.parallel_layout import ParallelLayout, parse_layout


@dataclass(frozen=True)
class EngineChoice:
    """Which engines a run uses and how they are made: every caller passes these through unchanged.

    A field declared here with `setting` (flowblend/settings.py: help, choices, type, CLI group) is an
    engine option of generate, serve, bench and the pipelines alike: their flags, the server's config and
    the factory's keyword arguments are all read from it (tests/test_one_declaration.py adds one)."""

    backend: str = setting("torch", "engine kind: torch (eager) | torch-compile | onnxruntime | tensorrt; "
                           "onnxruntime and tensorrt run the engines `flowblend export`/`build` made",
                           choices=lambda: factory.BACKENDS, group="backend")
    device: str = setting("cpu", "where the models run: cpu | cuda | cuda:N", group="device")
    dtype: str = setting("fp32", f"weights and activations: {' | '.join(factory.DTYPE_NAMES)} (fp8: the transformer "
                         "blocks' linears in FP8 e4m3 on GPUs with compute capability >= 8.9, BF16 elsewhere; "
                         "emulated exactly on the CPU; PyTorch engines only)", group="dtype")
    artifacts: str = setting("artifacts", "artifact root: ONNX exports and the engine store", group="artifacts")
    compile_mode: str | None = setting(None, "torch-compile: torch.compile's mode, e.g. max-autotune-no-cudagraphs "
                                             "(default: torch's)", group="backend")
    compile: str | None = setting(None, "torch.compile of each engine: regional (each repeated block once), whole, "
                                        "or none (default: regional on CUDA, none on the CPU; whole for --backend "
                                        "torch-compile)", choices=lambda: _compile_modes(), group="engine")
    attention: str = setting("auto", "the attention kernel (default auto: cuDNN on Hopper and newer, flash on "
                                     "Ampere/Ada, PyTorch's choice on the CPU; fp8: torchao's FA3 FP8 SDPA on Hopper, "
                                     "fp8-emulated: its arithmetic in FP32 anywhere)", choices=lambda: _attention_names(),
                             group="engine")
    fp8_keep_blocks: int = setting(0, "--dtype fp8: the first and last N transformer blocks stay BF16 (default 0)",
                                   type=int, group="engine")
    cfg: str = setting("batched", "CFG as one batch-2 forward (batched) or two batch-1 forwards per step "
                             "(sequential: half the activations, the same numbers; PyTorch engines only)",
                       choices=lambda: _cfg_modes(), group="engine")
    offload: str = setting("none", "where the text encoder and VAE sit during the loop: none (on --device all "
                                   "the run) | swap (each on --device only while it runs: the text encoder to "
                                   "encode, the VAE to decode; on the CPU during the loop) | cpu (as swap, and the "
                                   "text encoder encodes on the CPU: never on --device)",
                           choices=lambda: _offload_modes(), group="engine")
    parallel: str = setting("1x1", "one video over several processes: CFGxULYSSES ranks, e.g. 2x4 = the CFG halves on "
                                   "2 ranks x each sequence over 4 (8 ranks); launch with torchrun --nproc-per-node "
                                   "<C*U>; the Ulysses degree divides every model's head count (default 1x1: one "
                                   "process; PyTorch engines only)", group="parallel")
    parallel_timeout: float = setting(300.0, "--parallel: seconds any collective may wait for another rank before "
                                             "the job fails on every rank (a dead or hung rank)", type=float,
                                      group="parallel")

    def __post_init__(self):
        from ..engines.attention import ATTENTION_NAMES
        from ..engines.cfg_modes import check_cfg
        from ..engines.compile import check_compile
        from ..engines.kinds import check_kind_precision, engine_kind
        from ..families.offload import check_offload

        factory.check_backend(self.backend)
        factory.check_dtype(self.dtype)
        kind = engine_kind(self.backend)
        check_kind_precision(kind, self.dtype)
        if not kind.runs_transformers and (self.compile not in (None, "none") or self.attention != "auto"):
            raise FlowblendError(f"--compile and --attention choose how PyTorch engines run; --backend {self.backend} "
                                 "runs built engines: drop them or use --backend torch")
        if self.compile is not None:
            check_compile(self.compile, self.compile_mode)
        if self.attention not in ATTENTION_NAMES:
            raise FlowblendError(f"unknown --attention {self.attention!r}: choose one of {', '.join(ATTENTION_NAMES)}")
        check_cfg(self.cfg)
        check_offload(self.offload)
        if self.cfg != "batched" and not kind.runs_transformers:
            raise FlowblendError(f"--cfg {self.cfg} runs in PyTorch engines; --backend {self.backend} runs built "
                                 "engines at their built batch: drop --cfg or use --backend torch")
        layout = parse_layout(self.parallel)
        if not layout.is_single and not kind.runs_transformers:
            raise FlowblendError(f"--parallel {self.parallel} splits PyTorch engines' forwards; --backend {self.backend} "
                                 "runs built engines whole: drop --parallel or use --backend torch")
        if layout.cfg == 2 and self.cfg == "sequential":
            raise FlowblendError(f"--parallel {self.parallel} already runs one CFG row per rank: drop --cfg sequential")
        if not self.parallel_timeout > 0:
            raise FlowblendError(f"--parallel-timeout must be > 0 seconds, got {self.parallel_timeout}")
        object.__setattr__(self, "parallel", layout.spelling)  # one spelling in records and store keys
        if self.fp8_keep_blocks < 0:
            raise FlowblendError(f"--fp8-keep-blocks must be >= 0, got {self.fp8_keep_blocks}")

    @property
    def layout(self) -> ParallelLayout:
        """The parallel layout (engines/parallel_layout.py): CFG degree x Ulysses degree."""
        return parse_layout(self.parallel)

    @property
    def runs_transformers(self) -> bool:
        """Whether the engines run the loaded PyTorch transformers (else they run built engines only)."""
        return self.backend in factory.TORCH_BACKENDS

    @classmethod
    def of(cls, source) -> EngineChoice:
        """The choice from any object with attributes of the same names (argparse args, ServeConfig)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> dict:
        """What the engines run with, defaults filled in (records and reports): compile and attention
        as PyTorch engines of this kind choose them on this device, or the built engine's own."""
        from ..engines.kinds import engine_kind

        out = {k: v for k, v in self.to_dict().items() if k != "artifacts"}
        if self.runs_transformers:
            from ..engines.attention import choose_attention

            out["compile"] = engine_kind(self.backend).compile_for(self.device, self.compile)
            out["attention"] = choose_attention(self.device, factory.torch_dtype(self.dtype), self.attention).describe()
        else:
            out["compile"] = out["attention"] = f"inside the {self.backend} engine"
        return out


def _compile_modes() -> tuple[str, ...]:
    from ..engines.compile import COMPILE_MODES

    return tuple(COMPILE_MODES)


def _cfg_modes() -> tuple[str, ...]:
    from ..engines.cfg_modes import CFG_MODES

    return tuple(CFG_MODES)


def _offload_modes() -> tuple[str, ...]:
    from ..families.offload import OFFLOAD_MODES

    return tuple(OFFLOAD_MODES)


def _attention_names() -> tuple[str, ...]:
    from ..engines.attention import ATTENTION_NAMES

    return tuple(ATTENTION_NAMES)


ENGINE_OPTIONS = tuple(f.name for f in fields(EngineChoice))
