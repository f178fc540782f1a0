"""The model server's settings: one typed object, built once at start-up from flags and env."""

from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from berth import wire
from berth.runtime.engine import EngineConfig
from berth.runtime.server.metrics import MemoryBudget
from berth.runtime.server.reasoning import ReasoningParser
from berth.runtime.server.standby import StandbyPolicy

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
    # SIGTERM: admit for shutdown_delay_s more (with /ready failing), then in-flight requests
    # get drain_grace_s (lifecycle.ShutdownBudget adds the bounded steps after it).
    shutdown_delay_s: float = Field(wire.RUNTIME_SHUTDOWN_DELAY_S, ge=0)
    drain_grace_s: float = Field(wire.RUNTIME_DRAIN_TIMEOUT_S, ge=0)
    # vLLM's --reasoning-parser: <think> ... </think> to a chat answer's reasoning_content
    reasoning_parser: ReasoningParser | None = None
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_prompt_bytes: int | None = Field(None, ge=1)  # None: prompts.prompt_byte_limit
    # Slow and idle clients (connections.py): a request's headers must arrive within
    # header_timeout_s of the connection (or of the previous response), its body within
    # body_timeout_s; an idle keep-alive connection closes after keep_alive_timeout_s; beyond
    # max_connections open connections, requests get a 503.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    keep_alive_timeout_s: int = Field(5, ge=1)
    max_connections: int = Field(1024, ge=1)
    memory: MemoryBudget = MemoryBudget()
    pod_info_dir: str = wire.POD_INFO_DIR  # the downward API's files (labels: rotation.py)
    # Warm standby (standby.py): off unless idle_s is set; admin_token (wire.ENV_ADMIN_TOKEN)
    # authenticates POST /admin/park, /admin/wake and /admin/rotation (none: they answer 403).
    standby: StandbyPolicy = StandbyPolicy()
    admin_token: SecretStr | None = None
    log_level: str = "info"
    access_log: bool = True

    @property
    def model_name(self) -> str:
        """The name clients send as ``model``: the flag, else ``tiny`` or the directory's name."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.engine.model).name or self.engine.model

    def engine_config(self, model_dir: str) -> EngineConfig:
        """The engine's config for ``model_dir``; with standby on it keeps a host copy of its
        weights."""
        return replace(self.engine, model=model_dir, standby=self.standby.enabled)
