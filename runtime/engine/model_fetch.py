"""``berth fetch-model URI DEST``: the storage initializer of a pod whose model comes from a URI.

The operator renders it as the pod's init container (same runtime image), writing into an
emptyDir that the runtime container then mounts read-only; it also works by hand. Sources:

- ``https://`` and ``http://``: a URL whose path ends in ``.tar``, ``.tar.gz`` or ``.tgz`` is a
  model folder packed as a tar archive and is unpacked (a single top-level directory in the
  archive is the model folder itself); any other URL is one file, saved under its name. The
  body is streamed to disk; an optional SHA-256 is checked before anything is unpacked.
- ``hf://org/repo`` or ``hf://org/repo@revision``: a Hugging Face Hub snapshot, through
  ``huggingface_hub`` (which reads ``HF_TOKEN`` and ``HF_ENDPOINT`` from the environment), of the
  top-level files Berth loads (configs, safetensors, tokenizer, chat template), not the other
  formats or subfolders.

``s3://`` and ``gs://`` are not implemented (the CRD refuses them at admission).

DEST appears only complete: everything is written into a hidden sibling, which is renamed
into place at the end, and leftovers of an interrupted run are removed by the next one. A DEST
that already holds this URI's complete fetch is kept (an init container that runs again after
its pod restarts does not download twice).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from berth import wire

MARKER = ".berth-fetch.json"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What Berth loads from a Hub repository's top level; other formats (.bin, .gguf, .onnx, ...)
# and subfolders are skipped.
HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "LICENSE*", "README.md"]
UNSUPPORTED_SCHEMES = ("s3://", "gs://")
PROGRESS_EVERY_S = 5.0

Say = Callable[[str], None]


class FetchError(Exception):
    """The model could not be fetched; the message says what and from where."""


@dataclass(frozen=True)
class HfRef:
    repo_id: str
    revision: str | None


def parse_hf_uri(uri: str) -> HfRef:
    """``hf://org/repo[@revision]`` -> its repository and revision (None: the default branch)."""
    if re.match(wire.HF_MODEL_URI, uri) is None:
        raise FetchError(f"{uri!r} is not hf://org/repo or hf://org/repo@revision")
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    return HfRef(repo, revision or None)


def is_archive(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(ARCHIVE_SUFFIXES)


def file_name(url: str) -> str:
    """The name a single-file URL is saved under: the last segment of its path."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FetchError(f"{url}: the URL's path names no file to save")
    return name


def fetch_model(
    uri: str,
    dest: str | Path,
    sha256: str | None = None,
    say: Say = print,
    hf_endpoint: str | None = None,
) -> Path:
    """Fetch the model at ``uri`` into the folder ``dest``; return ``dest``."""
    dest = Path(dest)
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise FetchError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if _already_fetched(dest, uri, sha256):
        say(f"{dest} already holds {uri}")
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FetchError(f"{dest} exists and is not empty; fetch into a new or empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # an interrupted run's
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    staging.mkdir()
    started = time.monotonic()
    try:
        if uri.startswith(("https://", "http://")):
            root = _fetch_http(uri, staging, sha256, say)
        elif uri.startswith("hf://"):
            if sha256 is not None:
                raise FetchError("sha256 applies to https:// downloads; pin hf:// with @revision")
            root = _fetch_hf(parse_hf_uri(uri), staging / "model", say, hf_endpoint)
        elif uri.startswith(UNSUPPORTED_SCHEMES):
            raise FetchError(f"{uri}: s3:// and gs:// are not implemented; use https:// or hf://")
        else:
            raise FetchError(f"{uri}: unsupported URI; use https://, http:// or hf://")
        record = {"uri": uri, "sha256": sha256, "fetched_s": round(time.monotonic() - started)}
        (root / MARKER).write_text(json.dumps(record))
        try:
            if dest.exists():
                dest.rmdir()  # empty (checked above)
            root.rename(dest)
        except OSError as e:
            raise FetchError(
                f"cannot put the model at {dest} ({e.strerror}); if it is a mount point, "
                "fetch into a folder below it"
            ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"fetched {uri} into {dest} in {time.monotonic() - started:.1f} s")
    return dest


def _already_fetched(dest: Path, uri: str, sha256: str | None) -> bool:
    try:
        record = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(record.get("uri") == uri and record.get("sha256") == sha256)


def _fetch_http(url: str, staging: Path, sha256: str | None, say: Say) -> Path:
    """Download ``url``; unpack it if it is an archive. Returns the model folder's root."""
    tree = staging / "model"
    tree.mkdir()
    if not is_archive(url):
        download(url, tree / file_name(url), sha256, say)
        return tree
    archive = staging / "download"
    download(url, archive, sha256, say)
    say(f"unpacking {url}")
    try:
        with tarfile.open(archive) as tar:
            _extract(tar, tree)
    except (tarfile.TarError, OSError) as e:
        raise FetchError(f"{url}: not a readable tar archive: {e}") from e
    archive.unlink()
    entries = list(tree.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]  # the archive held the model folder itself
    return tree


def _extract(tar: tarfile.TarFile, tree: Path) -> None:
    """Unpack only what a model folder holds: files and folders inside ``tree``.

    Python's ``filter="data"`` does this where it exists (3.11.4+); Debian bookworm's 3.11.2, the
    runtime image's interpreter, lacks it, so the same rule is applied to each member here."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(tree, filter="data")  # refuses absolute paths, .., devices, links out
        return
    root = tree.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise tarfile.TarError(
                f"member {member.name!r} is not a file or folder inside the model"
            )
    tar.extractall(tree, members=members)  # every member checked above


def download(url: str, target: Path, sha256: str | None, say: Say) -> None:
    """Stream ``url`` into ``target``: complete and matching ``sha256``, or an error."""
    import httpx

    digest = hashlib.sha256()
    received = 0
    try:
        with httpx.stream(
            "GET",
            url,
            headers={"Accept-Encoding": "identity"},  # bytes on disk = bytes counted
            follow_redirects=True,
            timeout=httpx.Timeout(30.0, read=120.0),
        ) as response:
            if response.status_code != 200:
                raise FetchError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
            total = int(response.headers.get("content-length") or 0) or None
            last = time.monotonic()
            with target.open("wb") as f:
                for chunk in response.iter_raw():  # as it arrives
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if time.monotonic() - last > PROGRESS_EVERY_S:
                        last = time.monotonic()
                        say(f"{url}: {_progress(received, total)}")
    except httpx.HTTPError as e:
        raise FetchError(f"{url}: download failed after {received} bytes: {e}") from e
    if total is not None and received != total:
        raise FetchError(f"{url}: the connection closed after {received} of {total} bytes")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise FetchError(f"{url}: sha256 is {digest.hexdigest()}, expected {sha256}")
    say(f"{url}: {_progress(received, total)}")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def _progress(received: int, total: int | None) -> str:
    if total is None:
        return _size(received)
    return f"{_size(received)} of {_size(total)} ({100 * received // max(total, 1)}%)"


def _fetch_hf(ref: HfRef, tree: Path, say: Say, endpoint: str | None) -> Path:
    """Download the repository's loadable files into ``tree`` with ``snapshot_download``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{ref.repo_id}@{ref.revision or 'main'}"
    say(f"downloading {where} from the Hugging Face Hub")
    try:
        snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            local_dir=tree,
            allow_patterns=HF_PATTERNS,
            ignore_patterns=["*/*"],  # subfolders hold other formats (onnx/, original/, ...)
            endpoint=endpoint,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (private or gated: give the pod HF_TOKEN from a Secret in pod.env)"
        message = f"hf://{where}: {type(e).__name__}: {e}{hint if status in (401, 403) else ''}"
        raise FetchError(message) from e
    shutil.rmtree(tree / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
    return tree
