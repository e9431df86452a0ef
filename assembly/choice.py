"""Which engines a run uses and how they are made: the one declaration of the engine settings.

generate, serve, bench and the pipelines all hand an `EngineChoice` to the run's assembly
(assembly/run.py); its fields are the engine options. Kept free of torch: flag parsing reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flowblend.engines import factory
from flowblend.errors import FlowblendError


@dataclass(frozen=True)
class EngineChoice:
    """Which engines a run uses and how they are made: every caller passes these through unchanged.

    A field added here is an engine option of generate, serve and bench alike (each spells it as a
    flag or config field of the same name; tests/test_assembly.py checks that it arrives)."""

    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "fp32"  # a precision name (engines/factory.DTYPE_NAMES)
    artifacts: str = "artifacts"  # ONNX exports and the engine store
    compile_mode: str | None = None  # torch-compile: torch.compile's mode (None: torch's default)
    compile: str | None = None  # PyTorch engines: none | regional | whole (None: the kind's default, engines/kinds.py)
    attention: str = "auto"  # PyTorch engines: the SDPA kernel (engines/attention.py)
    fp8_keep_blocks: int = 0  # --dtype fp8: the first and last N blocks stay BF16 (engines/fp8.py)
    cfg: str = "batched"  # PyTorch engines: CFG as one batch-2 forward or two batch-1 (engines/cfg_modes.py)

    def __post_init__(self):
        from flowblend.engines.attention import ATTENTION_NAMES
        from flowblend.engines.cfg_modes import check_cfg
        from flowblend.engines.compile import check_compile
        from flowblend.engines.kinds import check_kind_precision, engine_kind

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
        if self.cfg != "batched" and not kind.runs_transformers:
            raise FlowblendError(f"--cfg {self.cfg} runs in PyTorch engines; --backend {self.backend} runs built "
                                 "engines at their built batch: drop --cfg or use --backend torch")
        if self.fp8_keep_blocks < 0:
            raise FlowblendError(f"--fp8-keep-blocks must be >= 0, got {self.fp8_keep_blocks}")

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
        from flowblend.engines.kinds import engine_kind

        out = {k: v for k, v in self.to_dict().items() if k != "artifacts"}
        if self.runs_transformers:
            from flowblend.engines.attention import choose_attention

            out["compile"] = engine_kind(self.backend).compile_for(self.device, self.compile)
            out["attention"] = choose_attention(self.device, factory.torch_dtype(self.dtype), self.attention).describe()
        else:
            out["compile"] = out["attention"] = f"inside the {self.backend} engine"
        return out


ENGINE_OPTIONS = tuple(f.name for f in fields(EngineChoice))
