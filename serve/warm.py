"""The one warm pipeline a server keeps: pair, engines, buffers (and CUDA graphs) loaded before ready.

`load()` does everything a request would otherwise pay for: load the pair, build or load the
engines of the configured backend, bind the shared buffers for the warm shape and default plan,
capture the CUDA graphs (when asked), and run one whole warm-up request including the video
encoder (a server runs that request as a job of its own, through the path every job takes). After
that nothing is loaded or compiled lazily for requests of the warm shape and plan.

Other plans of a warm shape get a sampler of their own on first use (a solver table and buffers:
milliseconds on CPU; with CUDA graphs, one capture) and are then kept, up to `MAX_SAMPLERS`.
"""
from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from flowblend.errors import FlowblendError

from ..assembly import engines_for, load_models, pipeline_for, warm_up_compiled
from ..families import PairFamily
from ..runtime.text_to_video import TextToVideo
from ..runtime.video import save_video
from .config import ServeConfig
from .video_request import JobSpec

MAX_SAMPLERS = 8
WARMUP_PROMPT = "a red circle moving left"


class WarmPipeline:
    """Generates videos for checked JobSpecs over engines loaded once; one request at a time."""

    def __init__(self, config: ServeConfig, family: PairFamily):
        self.config, self.family = config, family
        self.engine_choice = config.engine  # assembly/: what generate and bench pass too
        self.pair = None
        self.engines: dict | None = None
        self.warm_keys: set[tuple] = set()
        self._pipes: OrderedDict[tuple, TextToVideo] = OrderedDict()
        self.load_seconds: dict[str, float] = {}

    # -- start-up -----------------------------------------------------------------------------
    def load(self, warm_spec: JobSpec, stage: Callable[[str], None] = lambda s: None, warm_up: bool = True) -> None:
        """Pair, engines, buffers/graphs for `warm_spec`, then (`warm_up`) one warm-up request end to end.

        A server passes `warm_up=False` and runs its warm-up as a job of its own instead (serve/service.py):
        through the same worker path, record saves and video write into the results directory as every job."""
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        t0 = time.perf_counter()
        stage("loading the pair")
        self.pair = load_models(self.family.name, self.engine_choice, c.large, c.small, c.allow_download)
        t1 = time.perf_counter()
        stage(f"loading {c.engine.backend} engines")
        self.engines = engines_for(self.pair, self.engine_choice, warm_spec.request.latent_shape,
                                   max(warm_spec.guidance_per_step), build=c.build_engines)
        stage("compiling engines")  # torch.compile's first call, here and not in a user's request
        compiled_s = warm_up_compiled(self.pair, self.engines, self.engine_choice, warm_spec.request.latent_shape,
                                      warm_spec.options)
        t2 = time.perf_counter()
        self.warm_keys.add(warm_spec.shape_key())
        self.load_seconds = {"pair": round(t1 - t0, 3), "engines": round(t2 - t1 - compiled_s, 3),
                             "compile": round(compiled_s, 3)}
        if warm_up:
            stage(self.warm_up_stage)
            with tempfile.TemporaryDirectory() as tmp:
                video = self.generate(warm_spec)
                save_video(video, Path(tmp) / "warmup.mp4")  # the encoder's first call (ffmpeg start) too
            self.load_seconds["warmup"] = round(time.perf_counter() - t2, 3)

    @property
    def warm_up_stage(self) -> str:
        return "warming up" + (f" (capturing {self.config.graph} CUDA graphs)" if self.config.graph != "none" else "")

    # -- per request --------------------------------------------------------------------------
    def _pipe(self, spec: JobSpec) -> TextToVideo:
        key = (spec.plan.models, spec.options, spec.request.latent_shape)
        pipe = self._pipes.get(key)
        if pipe is None:
            if self.engines is None:
                raise FlowblendError("the pipeline is not loaded yet: wait for GET /health to say ready")
            pipe = pipeline_for(self.pair, self.engines, spec.plan, spec.options, self.engine_choice, self.config.graph)
            self._pipes[key] = pipe
            if len(self._pipes) > MAX_SAMPLERS:
                self._pipes.popitem(last=False)
        self._pipes.move_to_end(key)
        return pipe

    def generate(self, spec: JobSpec, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The video [3, F, H, W] in [-1, 1]; `on_step(i)` runs after each step (may raise to stop the job)."""
        r = spec.request
        video, _ = self._pipe(spec)(r.prompts[0], r.latent_shape, seed=r.seed, negative_prompt=r.negative_prompt,
                                    on_step=on_step)
        return video

    @property
    def syncs_per_step(self) -> bool:
        """Whether step timings need a device sync to be true (CUDA, eager: kernels run asynchronously)."""
        return str(self.config.engine.device).startswith("cuda")

    @property
    def steps_report(self) -> bool:
        """Whether `on_step` runs at every step boundary (not in a whole-loop graph: once, at the end)."""
        return self.config.graph != "whole"
