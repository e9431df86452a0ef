"""CUDA graphs over the sampler: the whole denoising loop in one graph, or one graph per step.

The sampler's loop allocates nothing, never syncs with the host and only touches static buffers
(runtime/sampler.py), so it can be recorded once and replayed per request:

1. warm up: run the loop eagerly once on a side stream (lazy cuBLAS/cuDNN init, TensorRT's first
   enqueue does deferred setup; none of that may happen inside a capture);
2. capture `Sampler.step(i)` for every step (both engines' calls, the CFG combine and the solver
   update) on that non-default stream; on any error the capture is ended before the error is
   raised, so the stream is never left capturing;
3. per request: `Sampler.load_request` copies noise and text into the static buffers, then one
   replay runs all N steps.

TorchEngine and TrtEngine both work: TrtEngine enqueues on torch's current stream, which is the
capture stream while capturing, so `execute_async_v3` is recorded like any kernel, together with
the device copy of each step's timestep row into the context's fixed timestep input (addresses
never change after binding; a new buffer set gets new contexts, engines/trt_engine.py).
All graphs of one runner are captured into ONE memory pool (`capture_begin(pool=...)`, on the same
side stream, as torch.cuda.graph's docs ask for effective sharing): per-step graphs with PyTorch
engines would otherwise each keep a forward's activations alive. Graphs are cached by (mode, shapes, plan and its stage
segments, solver, shift, per-step guidance, dtype, device, engines); every shape keeps its own buffers (a sampler per
shape), because a graph replays into exactly the memory it was captured on.

`mode="per_step"` captures one graph per step (engine call + its combine), the granularity
existing TensorRT diffusion pipelines use, for comparison; `mode="eager"` runs the plain loop.
The capture steps go through a small backend object (the `GraphBackend` protocol, implemented by
`TorchGraphBackend`), so the state machine (idle -> warming -> capturing -> ready | failed) is tested
on CPU with a stand-in backend.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from flowblend.errors import FlowblendError

from .graph_modes import MODES
from .sampler import Sampler


class GraphState(str, enum.Enum):
    IDLE = "idle"
    WARMING = "warming"
    CAPTURING = "capturing"
    READY = "ready"
    FAILED = "failed"


@runtime_checkable
class GraphBackend(Protocol):
    """What GraphRunner asks of a capture backend: every method it calls, in the order it calls them."""

    def warm_up(self, fn: Callable[[], None]) -> None:
        """Run `fn` once outside any capture, so lazy initialisation happens before recording."""

    def begin_capture(self, body: Callable[[], None]) -> Any:
        """Start recording; the caller runs `body` next, then `end_capture`. Returns the graph handle."""

    def end_capture(self, graph: Any) -> None:
        """Stop recording, also after a failure inside `body` (the stream must not stay capturing)."""

    def is_capturing(self) -> bool:
        """Whether the capture stream is still recording (it must not be after `end_capture`)."""

    def discard_stream(self) -> None:
        """After a failed capture: use a fresh stream for later captures."""

    def replay(self, graph: Any) -> None:
        """Launch a captured graph."""


class TorchGraphBackend:
    """The GraphBackend of CUDA: torch.cuda.CUDAGraph captured on a side stream of `device`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise FlowblendError(f"CUDA graphs need a CUDA device, the sampler is on {self.device}: use "
                                 "mode='eager' (or --graph none), or run on --device cuda")
        self.stream = torch.cuda.Stream(self.device)
        self.pool = None  # one graph_pool_handle() for every capture of this backend, made at the first
        self._stream_ctx = None

    def warm_up(self, fn) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def begin_capture(self, body):
        """Start recording on the side stream; `body` is what the caller runs next (a fake backend replays it)."""
        torch.cuda.synchronize(self.device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self._stream_ctx = torch.cuda.stream(self.stream)
        self._stream_ctx.__enter__()
        try:
            graph.capture_begin(pool=self.pool)
        except BaseException:
            self._stream_ctx.__exit__(None, None, None)
            raise
        return graph

    def end_capture(self, graph) -> None:
        """End the capture even when it was invalidated (cudaStreamEndCapture ends it and reports why)."""
        try:
            graph.capture_end()
        finally:
            self._stream_ctx.__exit__(None, None, None)

    def is_capturing(self) -> bool:
        with torch.cuda.stream(self.stream):
            return torch.cuda.is_current_stream_capturing()

    def discard_stream(self) -> None:
        """After a failed capture: later captures use a fresh stream (torch may still route its allocations)."""
        torch.cuda.synchronize(self.device)
        self.stream = torch.cuda.Stream(self.device)

    def replay(self, graph) -> None:
        graph.replay()


@dataclass
class CapturedLoop:
    """The graphs of one cache key and the sampler (buffers) they were captured over."""

    sampler: Sampler
    state: GraphState = GraphState.IDLE
    graphs: list = field(default_factory=list)
    error: str | None = None


class GraphRunner:
    """Sample through CUDA graphs: `GraphRunner(sampler, mode="whole").sample(noise, embeds, neg)`.

    Returns what `Sampler.sample` returns. `load(...)` + `replay()` split a request for benchmarks
    (copies, then the launch alone).
    """

    def __init__(self, sampler: Sampler, mode: str = "whole", backend: GraphBackend | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown graph mode {mode!r}: choose one of {', '.join(MODES)}")
        self.sampler = sampler
        self.mode = mode
        self.backend = backend if backend is not None or mode == "eager" else TorchGraphBackend(sampler.device)
        self.cache: dict[tuple, CapturedLoop] = {}
        self.current: CapturedLoop | None = None

    # -- cache --------------------------------------------------------------------------------
    def key(self, latent_shape, text_shape) -> tuple:
        s = self.sampler
        return (self.mode, tuple(latent_shape), tuple(text_shape), s.plan.models, s.plan.segments, s.plan.cached, s.options,
                s.guidance_scales, s.dtype, str(s.device), tuple((n, id(e)) for n, e in s.engines.items()))

    def _sampler_for_new_key(self) -> Sampler:
        """The runner's sampler for its first shape; a sibling with its own buffers for every other."""
        if all(entry.sampler is not self.sampler for entry in self.cache.values()):
            return self.sampler
        s = self.sampler
        return Sampler(s.engines, s.plan, s.options, device=s.device, dtype=s.dtype)  # same options: same table

    @property
    def state(self) -> GraphState:
        return self.current.state if self.current is not None else GraphState.IDLE

    # -- capture ------------------------------------------------------------------------------
    def _fail(self, entry: CapturedLoop, what: str, exc: BaseException) -> FlowblendError:
        entry.state, entry.graphs = GraphState.FAILED, []
        entry.error = f"{what}: {type(exc).__name__}: {exc}"
        return FlowblendError(f"CUDA graph {entry.error}. The loop must not allocate new buffers or sync with the "
                              "host; run with mode='eager' (--graph none) to see the error outside a capture")

    def _capture(self, entry: CapturedLoop, request: tuple) -> None:
        sampler = entry.sampler
        n = len(sampler.plan)
        entry.state = GraphState.WARMING
        try:
            sampler.load_request(*request)
            self.backend.warm_up(sampler.run_loop)
        except Exception as exc:
            raise self._fail(entry, "warm-up failed", exc) from exc
        entry.state = GraphState.CAPTURING
        spans = [range(n)] if self.mode == "whole" else [range(i, i + 1) for i in range(n)]
        graphs = []
        for span in spans:
            at = {"step": span.start}

            def body(span=span, at=at):
                for i in span:
                    at["step"] = i
                    sampler.step(i)

            graph = self.backend.begin_capture(body)
            failure = None
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - whatever it was, end the capture first
                failure = exc
            try:
                self.backend.end_capture(graph)
            except Exception as exc:  # noqa: BLE001 - an invalidated capture reports here
                failure = failure or exc
            if failure is None and self.backend.is_capturing():
                failure = RuntimeError("the stream was still capturing after end_capture")
            if failure is not None:
                self.backend.discard_stream()
                error = self._fail(entry, f"capture failed at step {at['step']} ({sampler.plan.models[at['step']]})",
                                   failure)
                if not isinstance(failure, Exception):
                    raise failure  # KeyboardInterrupt and friends: capture ended, state failed, re-raised as is
                raise error from failure
            graphs.append(graph)
        entry.graphs, entry.state = graphs, GraphState.READY

    # -- per request ----------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, noise, prompt_embeds, negative_prompt_embeds=None, prompt_mask=None,
             negative_prompt_mask=None) -> None:
        """Copy a request into its shape's static buffers, warming up and capturing that shape first if new."""
        request = (noise, prompt_embeds, negative_prompt_embeds, prompt_mask, negative_prompt_mask)
        if self.mode == "eager":
            self.sampler.load_request(*request)
            self.current = CapturedLoop(self.sampler, GraphState.READY)
            return
        text_shape = tuple(prompt_embeds.shape[-2:])
        key = self.key(tuple(noise.shape[1:]), text_shape)
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = CapturedLoop(self._sampler_for_new_key())
        self.current = entry
        if entry.state is GraphState.FAILED:
            raise FlowblendError(f"CUDA graph for this shape failed earlier ({entry.error}); use mode='eager'")
        if entry.state in (GraphState.IDLE, GraphState.WARMING):  # WARMING: a warm-up was interrupted
            self._capture(entry, request)
        entry.sampler.load_request(*request)

    @torch.no_grad()
    def replay(self, on_step: Callable[[int], None] | None = None) -> None:
        """Run every step of the loaded request: one launch (whole), one per step (per_step) or the loop (eager).

        `on_step(i)` runs after step i where Python regains control: after each step (eager, per_step), or once
        after the whole-loop launch (so a cancellation raised from it takes effect at the end).
        """
        entry = self.current
        if entry is None or entry.state is not GraphState.READY:
            state = "nothing loaded" if entry is None else f"state {entry.state.value}"
            raise FlowblendError(f"replay() before a graph was captured ({state}): call load(...) or sample(...) first")
        if self.mode == "eager":
            entry.sampler.run_loop(on_step=on_step)
            return
        for i, graph in enumerate(entry.graphs):
            self.backend.replay(graph)
            if on_step is not None:
                on_step(i if self.mode == "per_step" else len(entry.sampler.plan) - 1)

    @property
    def latents(self) -> torch.Tensor:
        """The static latent buffer of the current request (overwritten by the next one)."""
        return self.current.sampler.buffers.latents

    def sample(self, noise, prompt_embeds, negative_prompt_embeds=None, prompt_mask=None,
               negative_prompt_mask=None, progress: bool = False,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Denoise `noise` [1, C, F, H, W]; returns the final latents (float32, a copy), as Sampler.sample.

        `progress` draws a per-step bar in eager mode only: a graph runs its steps without returning to Python.
        `on_step` as in `replay`.
        """
        if self.mode == "eager":
            self.current = CapturedLoop(self.sampler, GraphState.READY)
            return self.sampler.sample(noise, prompt_embeds, negative_prompt_embeds, prompt_mask,
                                       negative_prompt_mask, progress=progress, on_step=on_step)
        self.load(noise, prompt_embeds, negative_prompt_embeds, prompt_mask, negative_prompt_mask)
        self.replay(on_step)
        return self.latents.clone()
