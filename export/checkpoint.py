"""A diffusers transformer checkpoint read straight into the export layout, one tensor at a time.

diffusers' `from_pretrained` maps a whole safetensors shard and keeps it mapped while it converts
every tensor; the FP32 islands it keeps stay views of that mapping. Every page it touches then counts
in the process's RSS: a Wan 14B export held the FP16 model plus its whole FP32 checkpoint (twice the
model again) before tracing started. Here the model is built on the meta device and each parameter is
materialised directly in its export dtype (FP16/BF16 regions, FP32 islands copied from the source
values, never through FP16), and the shard's mapping is closed every CHUNK_BYTES of source read, so at
most about that much of the source is resident beside the model. Sharded checkpoints (the
`.safetensors.index.json` of the published 14B models) are read shard by shard.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flowblend.errors import FlowblendError

from .precision import check_coverage, in_island, islands_of

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = f"{WEIGHTS}.index.json"
CHUNK_BYTES = 256 * 1024**2  # source bytes read through one mapping before it is closed


def checkpoint_folder(source: str, subfolder: str | None, local_only: bool) -> Path:
    """The local folder holding the config and weights: `source/subfolder`, or a hub id's cached snapshot."""
    root = Path(source).expanduser()
    if root.exists():
        return root / subfolder if subfolder else root
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    snapshot = Path(snapshot_download(source, allow_patterns=[pattern], local_files_only=local_only))
    return snapshot / subfolder if subfolder else snapshot


def weight_map(folder: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a single-file or sharded safetensors checkpoint; one-line errors if a
    file the checkpoint names is missing."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FlowblendError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); re-download "
                                 "the checkpoint") from exc
        missing = sorted({f for f in names.values() if not (folder / f).is_file()})
        if missing:
            raise FlowblendError(f"{folder} lacks {len(missing)} of the shards its {INDEX} names ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}); re-download the checkpoint")
        return {name: folder / f for name, f in names.items()}
    single = folder / WEIGHTS
    if not single.is_file():
        found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        raise FlowblendError(f"{folder} has no {WEIGHTS} or {INDEX} (found: {', '.join(found) or 'none'}); "
                             "export reads safetensors checkpoints as diffusers' save_pretrained writes them")
    with _opened(single) as handle:
        return {name: single for name in handle.keys()}


class _opened:
    """safe_open with a one-line error for a damaged file; the mapping is dropped when the block ends."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def __enter__(self):
        from safetensors import SafetensorError, safe_open

        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise FlowblendError(f"{self.path} is not a readable safetensors file ({_first_line(exc)}): it may be "
                                 "truncated; re-download the checkpoint") from exc
        return self.handle

    def __exit__(self, *exc):
        self.handle = None  # the last reference: the file is unmapped here (views of it must not outlive it)
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def empty_model(cls, folder: Path) -> nn.Module:
    """The model of `folder`'s config with its parameters on the meta device and its computed (non-persistent)
    buffers real, as diffusers builds it before loading."""
    from accelerate import init_empty_weights

    config = cls.load_config(str(folder))
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    return model


def load_transformer_in_layout(cls, source: str, subfolder: str | None, dtype: torch.dtype,
                               local_files_only: bool = True) -> nn.Module:
    """A transformer of class `cls` from a diffusers checkpoint, in the export layout of `dtype`.

    Regions (export/precision.py) are read in `dtype`, islands in FP32 from the source values, computed
    buffers in FP32. Refuses, in one line, a missing or damaged shard, a missing tensor and a shape
    that differs from the config's model.
    """
    folder = checkpoint_folder(source, subfolder, local_files_only)
    files = weight_map(folder)
    model = empty_model(cls, folder)
    model.register_to_config(_name_or_path=source)
    islands = islands_of(model)
    expected = dict((*model.named_parameters(), *model.named_buffers(remove_duplicate=False)))
    missing = sorted(n for n, t in expected.items() if t.is_meta and n not in files)
    if missing:
        raise FlowblendError(f"{folder} lacks {len(missing)} of {cls.__name__}'s weights (e.g. {missing[:3]}): a "
                             "shard is missing or this is not a checkpoint of that model")
    shards: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            shards.setdefault(files[name], []).append(name)
    for shard, names in shards.items():
        _load_shard(model, shard, names, expected, islands, dtype)
    for name, buffer in model.named_buffers():  # e.g. RoPE tables an older diffusers computed in float64
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            _assign(model, name, buffer.float())
    check_coverage(model)
    return model.eval()


def _load_shard(model: nn.Module, shard: Path, names: list[str], expected: dict, islands, dtype) -> None:
    """Materialise `names` from one shard, reopening the file every CHUNK_BYTES so its touched pages go."""
    pending = list(names)
    while pending:
        read = 0
        with _opened(shard) as handle:
            while pending and read < CHUNK_BYTES:
                name = pending.pop(0)
                try:
                    source = handle.get_tensor(name)
                except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                    raise FlowblendError(f"cannot read {name} from {shard} ({_first_line(exc)}): the file may be "
                                         "truncated; re-download the checkpoint") from exc
                want = expected[name]
                if tuple(source.shape) != tuple(want.shape):
                    raise FlowblendError(f"{shard.name}: {name} has shape {tuple(source.shape)}, the config's model "
                                         f"{tuple(want.shape)}: the config and weights are of different models")
                target = source.dtype
                if source.is_floating_point():
                    target = torch.float32 if in_island(name, islands) else dtype
                value = torch.empty(source.shape, dtype=target)
                value.copy_(source)  # converted into memory of its own: nothing keeps the mapping alive
                read += source.numel() * source.element_size()
                del source
                _assign(model, name, value)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value
