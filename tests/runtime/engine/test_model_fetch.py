"""``berth fetch-model`` against real HTTP servers on loopback (a file host and a fake Hugging Face
Hub): single files, archives, hf:// snapshots with a token, errors that name the URL, and no
partial model left behind by a failed or interrupted download."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from berth.cli import main
from berth.runtime.engine.model_fetch import (
    MARKER,
    FetchError,
    HfRef,
    fetch_model,
    parse_hf_uri,
)


class ModelHost:
    """A loopback HTTP server: ``files`` by path; ``/truncated/...`` promises more than it
    sends; ``/moved`` redirects to ``/model.tar.gz``; anything else is a 404."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/model.tar.gz")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = host.files.get(self.path.removeprefix("/truncated").removeprefix("/slow"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.startswith("/slow"):  # half now, the rest when released
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    host.release.wait(30)
                    with contextlib.suppress(OSError):
                        self.wfile.write(body[len(body) // 2 :])
                    return
                if self.path.startswith("/truncated"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def host() -> Iterator[ModelHost]:
    served = ModelHost()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.release.set()
    served.server.shutdown()
    served.server.server_close()
    thread.join(10)


def tar_of(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MODEL_FILES = {"config.json": b'{"architectures": []}', "model.safetensors": bytes(range(256)) * 64}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MARKER}


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_single_file_is_saved_under_its_name(host: ModelHost, tmp_path: Path) -> None:
    host.files["/weights/config.json"] = MODEL_FILES["config.json"]
    dest = tmp_path / "model"
    said: list[str] = []
    assert fetch_model(f"{host.url}/weights/config.json", dest, say=said.append) == dest
    assert contents(dest) == {"config.json": MODEL_FILES["config.json"]}
    assert siblings(dest) == ["model"]  # no staging folder left
    assert said[-1].startswith(f"fetched {host.url}/weights/config.json into {dest}")


@pytest.mark.parametrize(
    ("name", "mode", "prefix"),
    [("model.tar.gz", "w:gz", "smollm2/"), ("model.tgz", "w:gz", ""), ("model.tar", "w", "")],
)
def test_archive_is_unpacked_as_the_model_folder(
    host: ModelHost, tmp_path: Path, name: str, mode: str, prefix: str
) -> None:
    """A single top-level directory in the archive is the model folder itself."""
    host.files[f"/{name}"] = tar_of({prefix + k: v for k, v in MODEL_FILES.items()}, mode)
    dest = tmp_path / "model"
    fetch_model(f"{host.url}/{name}", dest, say=lambda _: None)
    assert contents(dest) == MODEL_FILES
    assert siblings(dest) == ["model"]


def test_redirects_are_followed(host: ModelHost, tmp_path: Path) -> None:
    host.files["/model.tar.gz"] = tar_of(MODEL_FILES)
    fetch_model(f"{host.url}/moved", tmp_path / "model", say=lambda _: None)
    assert contents(tmp_path / "model") == {"moved": host.files["/model.tar.gz"]}  # by URL name
    assert host.requests == ["/moved", "/model.tar.gz"]


def test_fetched_archive_of_a_real_model_loads_in_the_engine(
    host: ModelHost, tmp_path: Path
) -> None:
    from berth.runtime.engine import Engine, EngineConfig, SamplingParams
    from berth.runtime.engine.testmodels import make_model

    made = make_model("tiny", tmp_path / "tiny", dtype="float32")
    host.files["/tiny.tar.gz"] = tar_of({f"tiny/{p.name}": p.read_bytes() for p in made.iterdir()})
    dest = fetch_model(f"{host.url}/tiny.tar.gz", tmp_path / "fetched", say=lambda _: None)
    engine = Engine(EngineConfig(model=str(dest), device="cpu", num_kv_blocks=16))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert engine.generate(["hello"], params)[0].num_output_tokens == 4


def test_404_is_an_error_naming_the_url_and_leaves_nothing(host: ModelHost, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with pytest.raises(FetchError, match=rf"{host.url}/nope.tar.gz: HTTP 404 Not Found"):
        fetch_model(f"{host.url}/nope.tar.gz", dest, say=lambda _: None)
    assert siblings(dest) == []


def test_fetch_model_command_exits_non_zero_with_the_reason(
    host: ModelHost, tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["fetch-model", f"{host.url}/nope", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert f"Error: {host.url}/nope: HTTP 404 Not Found" in result.output
    assert not (tmp_path / "m").exists()


def test_interrupted_download_leaves_no_partial_model(host: ModelHost, tmp_path: Path) -> None:
    host.files["/model.safetensors"] = MODEL_FILES["model.safetensors"]
    dest = tmp_path / "model"
    with pytest.raises(FetchError, match=rf"{host.url}/truncated/model.safetensors: "):
        fetch_model(f"{host.url}/truncated/model.safetensors", dest, say=lambda _: None)
    assert siblings(dest) == []


def test_a_killed_fetch_leaves_no_model_and_the_next_run_completes(
    host: ModelHost, tmp_path: Path
) -> None:
    """SIGKILL mid-download (a node losing power, an OOM kill): DEST never appears half-written;
    the init container's next run removes the leftovers and fetches again."""
    host.files["/model.tar.gz"] = tar_of(MODEL_FILES)
    dest = tmp_path / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "berth", "fetch-model", f"{host.url}/slow/model.tar.gz", str(dest)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob(".model.partial-*/download")):
            assert process.poll() is None and time.monotonic() < deadline, "no download started"
            time.sleep(0.05)
        process.kill()
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".model.partial-{process.pid}"]
    host.release.set()
    fetch_model(f"{host.url}/model.tar.gz", dest, say=lambda _: None)
    assert contents(dest) == MODEL_FILES
    assert siblings(dest) == ["model"]


def test_checksum_mismatch_is_refused_and_a_match_accepted(host: ModelHost, tmp_path: Path) -> None:
    body = tar_of(MODEL_FILES)
    host.files["/model.tar.gz"] = body
    url = f"{host.url}/model.tar.gz"
    with pytest.raises(FetchError, match=f"sha256 is {hashlib.sha256(body).hexdigest()}"):
        fetch_model(url, tmp_path / "model", sha256="0" * 64, say=lambda _: None)
    assert siblings(tmp_path / "model") == []
    fetch_model(url, tmp_path / "model", sha256=hashlib.sha256(body).hexdigest(), say=print)
    assert contents(tmp_path / "model") == MODEL_FILES


def test_a_complete_fetch_is_kept_and_not_downloaded_again(host: ModelHost, tmp_path: Path) -> None:
    """An init container that runs again after its pod restarts finds its model in place."""
    host.files["/model.tar.gz"] = tar_of(MODEL_FILES)
    url = f"{host.url}/model.tar.gz"
    fetch_model(url, tmp_path / "model", say=lambda _: None)
    said: list[str] = []
    fetch_model(url, tmp_path / "model", say=said.append)
    assert host.requests == ["/model.tar.gz"]
    assert said == [f"{tmp_path / 'model'} already holds {url}"]


def test_a_killed_runs_leftovers_are_removed_and_an_empty_dest_is_filled(
    host: ModelHost, tmp_path: Path
) -> None:
    host.files["/config.json"] = b"{}"
    leftover = tmp_path / ".model.partial-4242"
    (leftover / "model").mkdir(parents=True)
    (tmp_path / "model").mkdir()  # e.g. made by an earlier mkdir -p
    fetch_model(f"{host.url}/config.json", tmp_path / "model", say=lambda _: None)
    assert siblings(tmp_path / "model") == ["model"]
    assert contents(tmp_path / "model") == {"config.json": b"{}"}


def test_a_non_empty_dest_that_is_not_this_fetch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FetchError, match="exists and is not empty"):
        fetch_model("https://example.invalid/m.tar", tmp_path / "model", say=lambda _: None)


def test_archive_members_that_escape_the_folder_are_refused(
    host: ModelHost, tmp_path: Path
) -> None:
    host.files["/evil.tar.gz"] = tar_of({"../escaped.txt": b"x", "config.json": b"{}"})
    with pytest.raises(FetchError, match="not a readable tar archive"):
        fetch_model(f"{host.url}/evil.tar.gz", tmp_path / "in" / "model", say=lambda _: None)
    assert not (tmp_path / "in" / "escaped.txt").exists()
    assert siblings(tmp_path / "in" / "model") == []


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/llama", "s3:// and gs:// are not implemented"),
        ("gs://bucket/llama", "s3:// and gs:// are not implemented"),
        ("ftp://host/llama.tar", "unsupported URI"),
        ("hf://just-a-name", "is not hf://org/repo"),
    ],
)
def test_unfetchable_uris_are_refused_before_anything_is_written(
    tmp_path: Path, uri: str, message: str
) -> None:
    with pytest.raises(FetchError, match=message):
        fetch_model(uri, tmp_path / "model", say=lambda _: None)
    assert siblings(tmp_path / "model") == []


def test_sha256_is_refused_for_hf_uris(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="pin hf:// with @revision"):
        fetch_model("hf://org/repo", tmp_path / "m", sha256="a" * 64, say=lambda _: None)


@pytest.mark.parametrize(
    ("uri", "ref"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", HfRef("HuggingFaceTB/SmolLM2-135M-Instruct", None)),
        ("hf://org/repo@v1.0", HfRef("org/repo", "v1.0")),
        ("hf://org/repo@refs/pr/3", HfRef("org/repo", "refs/pr/3")),
    ],
)  # fmt: skip
def test_hf_uris_name_a_repository_and_an_optional_revision(uri: str, ref: HfRef) -> None:
    assert parse_hf_uri(uri) == ref


class FakeHub:
    """The three Hub endpoints snapshot_download uses (revision info, tree listing, resolve),
    on loopback, for one repository; it answers only requests that carry ``token``."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo: str, files: dict[str, bytes], token: str) -> None:
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self.reply(401, b'{"error": "Invalid credentials"}', {})
                elif path == f"/api/models/{repo}/revision/main":
                    info = {"id": repo, "sha": hub.COMMIT, "siblings": []}
                    self.reply(200, json.dumps(info).encode(), {})
                elif path == f"/api/models/{repo}/tree/{hub.COMMIT}":
                    tree = [
                        {"type": "file", "path": name, "size": len(data), "oid": f"oid{i}"}
                        for i, (name, data) in enumerate(files.items())
                    ]
                    self.reply(200, json.dumps(tree).encode(), {})
                elif (name := path.removeprefix(f"/{repo}/resolve/{hub.COMMIT}/")) in files:
                    etag = f'"{hashlib.sha1(files[name]).hexdigest()}"'
                    self.reply(200, files[name], {"X-Repo-Commit": hub.COMMIT, "ETag": etag})
                else:
                    self.reply(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

            do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    skipped = {"pytorch_model.bin": b"pickle", "onnx/model.safetensors": b"other format"}
    files = {**MODEL_FILES, **skipped, "tokenizer.json": b"{}"}
    served = FakeHub("org/tiny", files, token="hf_secret")
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    yield served
    served.server.shutdown()
    served.server.server_close()
    thread.join(10)


def test_hf_uri_downloads_the_loadable_files_with_the_token(hub: FakeHub, tmp_path: Path) -> None:
    dest = fetch_model("hf://org/tiny", tmp_path / "model", say=lambda _: None, hf_endpoint=hub.url)
    assert contents(dest) == {**MODEL_FILES, "tokenizer.json": b"{}"}  # no .bin, no .cache
    assert not any("pytorch_model.bin" in r or "onnx/" in r for r in hub.requests)
    assert siblings(dest) == ["model"]


def test_hf_uri_without_the_token_fails_naming_the_repo_and_leaves_nothing(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(
        FetchError, match=r"hf://org/tiny@main: (?s:.)*401(?s:.)*HF_TOKEN from a Secret"
    ):
        fetch_model("hf://org/tiny", tmp_path / "model", say=lambda _: None, hf_endpoint=hub.url)
    assert siblings(tmp_path / "model") == []


def test_archives_unpack_safely_without_python_s_data_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime image's Python 3.11.2 has no ``filter="data"``: the fallback keeps the rule."""

    from berth.runtime.engine import model_fetch

    monkeypatch.delattr(tarfile, "data_filter")
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        source = tmp_path / "m"
        source.mkdir()
        (source / "config.json").write_text("{}")
        tar.add(source, arcname="m")
    with tarfile.open(good) as tar:
        model_fetch._extract(tar, tmp_path / "out")
    assert (tmp_path / "out" / "m" / "config.json").read_text() == "{}"
    for name, kind in (("../escape", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        bad = tmp_path / f"bad-{kind!r}.tar"
        with tarfile.open(bad, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(b""))
        with tarfile.open(bad) as tar, pytest.raises(tarfile.TarError):
            model_fetch._extract(tar, tmp_path / "bad-out")
