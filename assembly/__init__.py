"""The one assembly of a run: an `EngineChoice` (choice.py) and the steps that turn a checked request
into a ready run (run.py: pair -> engines -> Sampler -> GraphRunner -> TextToVideo)."""
from .choice import ENGINE_OPTIONS, EngineChoice
from .run import (
    AssembledRun,
    TransformersOnly,
    as_loaded,
    assemble,
    eager_choice,
    engines_for,
    engines_over,
    load_models,
    pipeline_for,
    runner_for,
    sampler_for,
    warm_up_compiled,
)

__all__ = ["ENGINE_OPTIONS", "AssembledRun", "EngineChoice", "TransformersOnly", "as_loaded", "assemble",
           "eager_choice", "engines_for", "engines_over", "load_models", "pipeline_for", "runner_for", "sampler_for",
           "warm_up_compiled"]
