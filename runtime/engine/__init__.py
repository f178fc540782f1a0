"""Berth's inference engine: paged KV cache, prefix caching, continuous batching.

``Engine`` is the entry point; it imports torch but never pydantic, fastapi or click, so the
same code runs on the GPU machine and in CI.
"""

from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.engine import Engine
from berth.runtime.engine.outputs import EngineStats, RequestOutput, TokenLogprob

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
