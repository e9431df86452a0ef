"""Counting what a forward allocates without running it: on the meta device, every storage it creates and
how many are alive at once (bench/memory_plan.py plans a run's activations with these)."""
from __future__ import annotations

import weakref


class FusedAttention:
    """SDPA as a fused kernel allocates it: its output only (TorchFunctionMode; the math path would count the
    full score matrix, which cuDNN and flash attention never hold)."""

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    query = kwargs.get("query", args[0] if args else None)
                    return torch.empty_like(query)
                return func(*args, **kwargs)

        self._mode = Mode()
        return self._mode.__enter__()

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class LiveStorages:
    """Peak bytes of storages created inside the region and alive at once, on any device (meta included).

    bench/memory.py's LiveTensorBytes keys storages by address, which meta tensors lack; here a storage is
    its StorageImpl and stays alive while a tensor created on it does (a finalizer per tensor)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self
        self.current = self.peak = 0
        refs, sizes, known = {}, {}, set()

        def free(key):
            refs[key] -= 1
            if refs[key] == 0:
                del refs[key]
                self.current -= sizes.pop(key)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in refs:
                        known.add(t.untyped_storage()._cdata)  # weights, inputs: not the forward's own
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        key = t.untyped_storage()._cdata
                        if key in known:
                            continue
                        if key not in refs:
                            refs[key], sizes[key] = 0, t.untyped_storage().nbytes()
                            owner.current += sizes[key]
                            owner.peak = max(owner.peak, owner.current)
                        refs[key] += 1
                        weakref.finalize(t, free, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
