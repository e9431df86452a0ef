"""One I/O spec per exported transformer: names, shapes, dtypes and the min/opt/max profile.

The same object drives the ONNX export (sample inputs, dynamic dims), the TensorRT optimization
profile and the check that an engine fits the runtime's buffers, and it is saved in export.json
so the engines side never has to guess what was exported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from flowblend.errors import FlowblendError

from .base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP, VELOCITY
from .precisions import PRECISIONS

DTYPE_NAMES = {name: p.torch_dtype for name, p in PRECISIONS.items() if p.exportable}  # engines/kinds.py's


def dtype_name(dtype: str | torch.dtype) -> str:
    """"fp32"/"fp16"/"bf16" for a torch dtype or one of those names (what IOSpec and artifact keys use)."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    name = dtype if isinstance(dtype, str) else names.get(dtype)
    if name not in DTYPE_NAMES:
        raise FlowblendError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPE_NAMES)}")
    return name


@dataclass(frozen=True)
class IOSpec:
    """Shapes in latent units: latent (C, F, H, W) at batch B (2 with CFG), text (L, D)."""

    batch: int
    latent: tuple[int, int, int, int]
    text_len: int
    text_dim: int
    dtype: str = "fp32"  # of latents, text embeddings and velocity; timestep is always fp32
    with_mask: bool = False
    # dynamic dims for a min/opt/max profile: {"frames"|"height"|"width": (min, max)} in latent units
    dynamic: dict = field(default_factory=dict)
    # latent frames/height/width one transformer token covers: a dynamic dim moves in these steps
    patch: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self):
        if self.batch not in (1, 2):
            raise FlowblendError(f"batch must be 1 (no CFG) or 2 (CFG), got {self.batch}")
        if self.dtype not in DTYPE_NAMES:
            raise FlowblendError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for dim, (lo, hi) in self.dynamic.items():
            opt = self._dim(dim)
            if dim not in ("frames", "height", "width") or not lo <= opt <= hi:
                raise FlowblendError(f"dynamic {dim}=({lo}, {hi}) must be frames/height/width and contain "
                                     f"the export shape's {opt}")
            step = self.dim_multiple(dim)
            if lo % step or hi % step:
                raise FlowblendError(f"dynamic {dim}=({lo}, {hi}): the transformer patches {step} latent {dim} "
                                     f"at a time, so min and max must be multiples of {step}, e.g. "
                                     f"{max(step, lo // step * step)}:{-(-hi // step) * step}")
        object.__setattr__(self, "latent", tuple(self.latent))
        object.__setattr__(self, "patch", tuple(self.patch))
        object.__setattr__(self, "dynamic", {k: tuple(v) for k, v in self.dynamic.items()})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @property
    def static(self) -> bool:
        return not self.dynamic

    @property
    def input_names(self) -> tuple[str, ...]:
        return (LATENTS, TIMESTEP, TEXT_EMBEDS) + ((TEXT_MASK,) if self.with_mask else ())

    @property
    def output_names(self) -> tuple[str, ...]:
        return (VELOCITY,)

    def dim_multiple(self, name: str) -> int:
        """How many latent units of frames/height/width one token covers."""
        return self.patch[{"frames": 0, "height": 1, "width": 2}[name]]

    def _dim(self, name: str) -> int:
        return self.latent[{"frames": 1, "height": 2, "width": 3}[name]]

    def shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        """Input/output shapes at the profile's 'min', 'opt' or 'max' point."""
        c, f, h, w = self.latent
        dims = {"frames": f, "height": h, "width": w}
        if which != "opt":
            for name, (lo, hi) in self.dynamic.items():
                dims[name] = lo if which == "min" else hi
        lat = (self.batch, c, dims["frames"], dims["height"], dims["width"])
        out = {LATENTS: lat, TIMESTEP: (self.batch,), TEXT_EMBEDS: (self.batch, self.text_len, self.text_dim)}
        if self.with_mask:
            out[TEXT_MASK] = (self.batch, self.text_len)
        out[VELOCITY] = lat
        return out

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min, opt, max)} for a TensorRT optimization profile."""
        mins, opts, maxs = self.shapes("min"), self.shapes("opt"), self.shapes("max")
        return {n: (mins[n], opts[n], maxs[n]) for n in self.input_names}

    def input_dtypes(self) -> dict[str, torch.dtype]:
        out = {LATENTS: self.torch_dtype, TIMESTEP: torch.float32, TEXT_EMBEDS: self.torch_dtype}
        if self.with_mask:
            out[TEXT_MASK] = torch.int64
        return out

    def sample_inputs(self, seed: int = 0, timestep: float = 500.0) -> tuple[torch.Tensor, ...]:
        """Seeded inputs at the opt shape (text mask: the first 3/4 of tokens valid)."""
        g = torch.Generator().manual_seed(seed)
        shapes, dtypes = self.shapes("opt"), self.input_dtypes()
        out = []
        for name in self.input_names:
            if name == TIMESTEP:
                out.append(torch.full(shapes[name], float(timestep)))
            elif name == TEXT_MASK:
                mask = torch.zeros(shapes[name], dtype=torch.int64)
                mask[:, : max(1, 3 * self.text_len // 4)] = 1
                out.append(mask)
            else:
                out.append(torch.randn(shapes[name], generator=g).to(dtypes[name]))
        return tuple(out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dynamic"] = {k: list(v) for k, v in self.dynamic.items()}
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IOSpec":
        return cls(batch=d["batch"], latent=tuple(d["latent"]), text_len=d["text_len"], text_dim=d["text_dim"],
                   dtype=d.get("dtype", "fp32"), with_mask=d.get("with_mask", False),
                   dynamic={k: tuple(v) for k, v in d.get("dynamic", {}).items()},
                   patch=tuple(d.get("patch", (1, 1, 1))))

    def key(self) -> str:
        """Short text naming the shape profile, part of every artifact key."""
        c, f, h, w = self.latent
        dyn = "".join(f"-{k[0]}{lo}_{hi}" for k, (lo, hi) in sorted(self.dynamic.items()))
        return f"b{self.batch}-c{c}f{f}h{h}w{w}-t{self.text_len}x{self.text_dim}{'-m' if self.with_mask else ''}{dyn}"
