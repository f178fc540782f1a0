"""The model server's settings: one typed object, built once at start-up from flags and env."""

from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from berth.runtime.engine import EngineConfig
from berth.runtime.server.metrics import MemoryBudget

TINY = "tiny"  # --model tiny: make the random-weight test model on the fly


class ServerSettings(BaseModel):
    """How the server listens, admits, times out and drains; ``engine`` is the engine's own.

    ``engine.model`` holds what the user passed to ``--model`` (a directory or ``tiny``); the
    directory actually loaded is decided when the engine is built (``engine_config``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    engine: EngineConfig
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    max_waiting_requests: int = Field(256, ge=0)  # beyond the running batch; then 429
    retry_after_s: int = Field(1, ge=1)  # the Retry-After of a 429 or 503
    request_timeout_s: float = Field(600.0, gt=0)  # arrival to last token
    drain_grace_s: float = Field(30.0, ge=0)  # SIGTERM: in-flight requests get this long
    max_body_bytes: int = Field(8 << 20, ge=1024)
    memory: MemoryBudget = MemoryBudget()
    log_level: str = "info"
    access_log: bool = True

    @property
    def model_name(self) -> str:
        """The name clients send as ``model``: the flag, else ``tiny`` or the directory's name."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.engine.model).name or self.engine.model

    def engine_config(self, model_dir: str) -> EngineConfig:
        return replace(self.engine, model=model_dir)
