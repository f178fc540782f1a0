"""Berth's inference engine: paged KV cache, prefix caching, continuous batching.

``Engine`` is the entry point; it imports torch but never pydantic, fastapi or click, so the
same code runs on the GPU machine and in CI. It is imported on first use: the HTTP server's
process needs only the plain types below and never loads torch (the engine runs in a process of
its own).
"""

from typing import TYPE_CHECKING

from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.outputs import EngineStats, RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from berth.runtime.engine.engine import Engine


def __getattr__(name: str) -> object:
    if name == "Engine":
        from berth.runtime.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
