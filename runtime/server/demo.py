"""The model-server part of ``make demo``: serve ``tiny`` on the CPU, ask it one chat question
with the official ``openai`` client, and show the answer and the metric line that counted it.

The server runs as a real ``berth serve`` process (as in a pod) and is stopped the way
Kubernetes stops it, with SIGTERM, so the demo also shows a clean drain and exit.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

QUESTION = "Which berth is free for a 300-metre container ship?"
READY_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving_tiny(say: Callable[[str], None]) -> Iterator[str]:
    """``berth serve --model tiny`` on a free loopback port; yields its base URL."""
    port = _free_port()
    command = [
        sys.executable,
        "-c",
        "from berth.cli import main; main()",
        "serve",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with tempfile.TemporaryDirectory(prefix="berth-demo-") as tmp:
        log_path = Path(tmp) / "serve.log"
        with log_path.open("w") as log:
            say(f"starting: berth serve --model tiny --port {port} (log: {log_path})")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            base_url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(process, base_url, log_path)
                yield base_url
            finally:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        code = process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        code = process.wait()
                    say(f"server drained and exited with status {code}")


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"berth serve exited early:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"berth serve not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.25)


def counted_lines(metrics_text: str) -> list[str]:
    """The exposition lines that count finished requests and their tokens."""
    names = (
        "vllm:request_success_total{",
        "berth_generation_tokens_total{",
        "berth_prompt_tokens_total{",
    )
    return [line for line in metrics_text.splitlines() if line.startswith(names)]


def run_demo(say: Callable[[str], None] = print) -> str:
    """Serve tiny, send one chat request through the openai client, print the answer and the
    metric lines that counted it, stop the server. Returns the answer."""
    import openai

    with serving_tiny(say) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="berth-demo", max_retries=0)
        say(f"user: {QUESTION}")
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=24
        )
        answer = reply.choices[0].message.content or ""
        usage = reply.usage
        say(f"tiny (random weights, so the words are noise): {answer!r}")
        if usage is not None:
            say(
                f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
            )
        metrics = httpx.get(f"{base_url}/metrics", timeout=10).text
        for line in counted_lines(metrics):
            say(f"metrics: {line}")
    return answer
