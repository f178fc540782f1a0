"""Random test models, made once per session, and a Hugging Face greedy reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig
from berth.runtime.engine.testmodels import make_model


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_model(name, tmp_path_factory.mktemp(name), seed=0, dtype="float32")
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(model_factory: Callable[[str], Path]) -> Path:
    return model_factory("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path) -> Engine:
    """One shared engine for tests that leave it idle (generate/stream end every request)."""
    return Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[..., list[list[int]]]:
    """Greedy continuations from transformers' own implementation of the same checkpoint;
    ``adjust(logits, output so far)``, if given, changes each step's logits before the argmax."""
    from transformers import AutoModelForCausalLM

    models: dict[Path, Any] = {}

    def run(
        model_dir: Path,
        prompts: list[list[int]],
        max_tokens: int,
        adjust: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    ) -> list[list[int]]:
        if model_dir not in models:
            models[model_dir] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32
            ).eval()
        model = models[model_dir]
        outputs = []
        with torch.no_grad():
            for prompt in prompts:
                past, x, out = None, torch.tensor([prompt]), []
                for _ in range(max_tokens):
                    r = model(input_ids=x, past_key_values=past, use_cache=True)
                    past = r.past_key_values
                    logits = r.logits[0, -1]
                    if adjust is not None:
                        logits = adjust(logits, out)
                    token = int(logits.argmax())
                    out.append(token)
                    x = torch.tensor([[token]])
                outputs.append(out)
        return outputs

    return run
