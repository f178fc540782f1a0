"""Warm standby through the server: admin park and wake, the idle timeout, requests that arrive
while the runtime is parked or waking, and the 503 of a wake that gets no memory.

Real uvicorn servers with real engine processes (the CPU build really frees the weights'
storage on park and copies them back from the host copy on wake), and one real ``berth serve``
subprocess whose node agent cannot be reached, so that its lease never grants a wake.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from processes import serve_tiny, stop, wait_until
from prometheus_client.parser import text_string_to_metric_families
from server_harness import RunningServer, running_server

from berth import wire
from berth.runtime.engine import EngineConfig
from berth.runtime.server.standby import StandbyPolicy, StandbyState

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[(13 * k + 5 * j) % 500 + 3 for j in range(12 + 3 * k)] for k in range(6)]
MAX_TOKENS = 96


def _complete(url: str, k: int) -> str:
    body = {"model": "tiny", "prompt": PROMPTS[k], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def _state(url: str) -> str:
    body = httpx.get(f"{url}/health", timeout=10).json()
    return str(body["state"])


def _state_metric(server: RunningServer) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(server.metrics()):
        if family.name == "berth_standby_state":
            for sample in family.samples:
                values[sample.labels["state"]] = sample.value
    return values


def _metric(server: RunningServer, name: str) -> float:
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def standby_engine(engine_config: EngineConfig) -> EngineConfig:
    return dataclasses.replace(engine_config, standby=True)


@pytest.fixture(scope="module")
def parkable(standby_engine: EngineConfig) -> Iterator[RunningServer]:
    """Standby on, parking only when asked; an admin token."""
    with running_server(
        standby_engine, standby=StandbyPolicy(idle_s=0.0, park_deadline_s=10.0),
        admin_token=TOKEN,
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def reference(parkable: RunningServer) -> list[str]:
    """Greedy outputs before the runtime ever parked (the first test takes them)."""
    assert parkable.model_server.loop.entered[StandbyState.STANDBY] == 0
    return [_complete(parkable.base_url, k) for k in range(len(PROMPTS))]


def test_admin_endpoints_need_the_bearer_token(
    parkable: RunningServer, reference: list[str]
) -> None:
    url = parkable.base_url
    for path in ("/admin/park", "/admin/wake"):
        missing = httpx.post(f"{url}{path}", timeout=10)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "missing_token"
        wrong = httpx.post(f"{url}{path}", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 403
        assert wrong.json()["error"]["code"] == "invalid_token"
    assert _state(url) == "active"  # refused calls changed nothing


def test_admin_park_and_wake_move_the_state_shown_in_health_and_metrics(
    parkable: RunningServer,
) -> None:
    url = parkable.base_url
    r = httpx.post(f"{url}/admin/park", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"state": "standby"}
    assert _state(url) == "standby"
    metric = _state_metric(parkable)
    assert metric["standby"] == 1.0 and metric["active"] == 0.0
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200  # parked pods stay Ready
    again = httpx.post(f"{url}/admin/park", headers=AUTH, timeout=60)
    assert again.json() == {"state": "standby"}
    r = httpx.post(f"{url}/admin/wake", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"state": "active"}
    assert _state_metric(parkable)["active"] == 1.0


def test_requests_while_parked_wake_the_runtime_and_match_a_never_parked_one(
    parkable: RunningServer, reference: list[str]
) -> None:
    url = parkable.base_url
    for _ in range(2):
        assert httpx.post(f"{url}/admin/park", headers=AUTH, timeout=60).json()["state"] == (
            "standby"
        )
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda k: _complete(url, k), range(len(PROMPTS))))
        assert got == reference
        assert _state(url) == "active"


def test_requests_during_park_and_wake_all_succeed(
    parkable: RunningServer, reference: list[str]
) -> None:
    """Park while requests run (they finish first), with more arriving while it parks, then
    wake by hand while others arrive: every one succeeds with the never-parked output."""
    url = parkable.base_url
    preemptions = _metric(parkable, "berth_preemptions_total")
    with concurrent.futures.ThreadPoolExecutor(2 * len(PROMPTS) + 2) as pool:
        running = [pool.submit(_complete, url, k) for k in range(len(PROMPTS))]
        wait_until(lambda: parkable.model_server.loop.in_flight > 0, "requests running")
        park = pool.submit(httpx.post, f"{url}/admin/park", headers=AUTH, timeout=60)
        during_park = [pool.submit(_complete, url, k) for k in range(3)]
        assert park.result().status_code == 200
        assert [f.result() for f in running] == reference
        assert [f.result() for f in during_park] == reference[:3]
        assert _metric(parkable, "berth_preemptions_total") == preemptions  # they finished
        httpx.post(f"{url}/admin/park", headers=AUTH, timeout=60)
        wake = pool.submit(httpx.post, f"{url}/admin/wake", headers=AUTH, timeout=60)
        during_wake = [pool.submit(_complete, url, k) for k in range(3, len(PROMPTS))]
        assert wake.result().status_code == 200
        assert [f.result() for f in during_wake] == reference[3:]
    assert _state(url) == "active"


def test_admin_park_is_refused_while_standby_is_off(engine_config: EngineConfig) -> None:
    with running_server(engine_config, admin_token=TOKEN) as server:
        r = httpx.post(f"{server.base_url}/admin/park", headers=AUTH, timeout=10)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "standby_off"
        assert _state(server.base_url) == "active"


def test_the_idle_timeout_parks_and_the_next_request_wakes(
    standby_engine: EngineConfig, reference: list[str]
) -> None:
    """No admin token configured here: the admin endpoints answer 403 to any token."""
    with running_server(standby_engine, standby=StandbyPolicy(idle_s=0.5)) as server:
        url = server.base_url
        r = httpx.post(f"{url}/admin/park", headers=AUTH, timeout=10)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "admin_disabled"
        wait_until(lambda: _state(url) == "standby", "the idle park")
        assert _complete(url, 0) == reference[0]
        assert _state(url) == "active"
        wait_until(lambda: _state(url) == "standby", "the second idle park")
        assert server.model_server.loop.entered[StandbyState.STANDBY] == 2


def test_a_wake_that_gets_no_memory_answers_503_with_retry_after(tmp_path: Path) -> None:
    """``berth serve`` with a GPU budget leases it from a node agent that cannot be reached:
    it serves within its request, parks when asked, and its lease cannot get the memory back,
    so the request that would wake it gets a 503 (after the wake timeout), not a hang."""
    log = tmp_path / "serve.log"
    with ExitStack() as stack:
        url, process = serve_tiny(
            stack, log, "standby", (8 << 20, 8 << 20, "GPU-standby-test"),
            tmp_path / "no-agent.sock",
            env={wire.ENV_STANDBY_IDLE_SECONDS: "0", wire.ENV_ADMIN_TOKEN: TOKEN},
            flags=("--max-num-seqs", "4", "--wake-timeout", "1", "--retry-after", "7",
                   "--log-level", "warning"),
        )  # fmt: skip
        wait_until(lambda: _ready(url), f"the server's start ({log})", timeout_s=240)
        assert _complete(url, 0)
        assert httpx.post(f"{url}/admin/park", headers=AUTH, timeout=60).json() == {
            "state": "standby"
        }
        start = time.monotonic()
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 4}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "wake_failed"
        assert time.monotonic() - start < 30
        assert _state(url) == "standby"
        wake = httpx.post(f"{url}/admin/wake", headers=AUTH, timeout=60)
        assert wake.status_code == 503
        assert wake.headers["retry-after"] == "7"
        stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
