"""Which BLAS library each decode graph's matmuls are captured with, measured at start-up.

cuBLAS and cuBLASLt pick different kernels for the same skinny product, and neither wins at
every row count: with Llama-3-8B's linears on an H200, cuBLASLt's ran a decode step's matmuls
5 % faster at 32-96 rows and 2-6 % slower at 8-16 and 192-256 rows
(``benchmarks/results/blas-tuning-h200.md``). PyTorch reads its preferred library when a matmul
is issued, so a CUDA graph keeps the kernels of the library preferred while it was captured.
The runner times the model's own linears under each library at every decode batch size and
captures each decode graph under the faster one; eager steps keep PyTorch's default.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from berth.kernels.skinny_matmul import SkinnyConfig

log = logging.getLogger(__name__)

DEFAULT = "cublas"
LIBRARIES = (DEFAULT, "cublaslt")
# Another library must beat the default by this factor to be picked: the replays of one graph
# differ by about 1 %, and a pick within the noise would only make start-up less repeatable.
MIN_GAIN = 1.02
# The skinny kernel must beat BLAS by this factor (``pick_skinny``).
SKINNY_MIN_GAIN = MIN_GAIN


def pick(times_ms: Mapping[str, float], default: str = DEFAULT, min_gain: float = MIN_GAIN) -> str:
    """The library to capture with: the fastest, unless the default is within ``min_gain``."""
    if default not in times_ms:
        raise ValueError(f"no time for the default library {default!r}: {dict(times_ms)}")
    best = min(times_ms, key=lambda name: (times_ms[name], name != default))
    return best if times_ms[default] > times_ms[best] * min_gain else default


@contextlib.contextmanager
def preferred(library: str) -> Iterator[None]:
    """PyTorch's preferred BLAS library is ``library`` inside the block."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def time_matmuls(
    weights: Sequence[torch.Tensor],
    rows: int,
    replays: int = 5,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.linear,
) -> float:
    """Median ms of one CUDA-graph replay of ``rows`` rows times each weight (``x @ w.T`` by
    ``matmul``, ``nn.Linear``'s by default), in order: the matmuls of a decode step, under the
    preferred library. Each weight is read once per replay, so the model's weights (larger than
    L2) stream from memory as they do in a step."""
    device, dtype = weights[0].device, weights[0].dtype
    inputs = {k: torch.randn(rows, k, dtype=dtype, device=device)
              for k in {w.shape[1] for w in weights}}  # fmt: skip

    def run() -> None:
        for w in weights:
            matmul(inputs[w.shape[1]], w)

    with torch.inference_mode():
        run()  # outside the capture: the library's handles, workspaces and kernels load
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        times = []
        for _ in range(replays):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def choose(
    weights: Sequence[torch.Tensor], sizes: Iterable[int], libraries: Sequence[str] = LIBRARIES
) -> dict[int, str]:
    """Per decode batch size, the library whose matmuls ran faster (``pick``), logged."""
    choice: dict[int, str] = {}
    gains: dict[int, float] = {}
    for rows in sizes:
        times = {}
        for library in libraries:
            try:
                with preferred(library):
                    times[library] = time_matmuls(weights, rows)
            except RuntimeError as e:  # a library without kernels for these operands
                if library == DEFAULT:
                    raise
                log.warning("%s at %d rows failed (%s): not a choice there", library, rows, e)
        choice[rows] = pick(times)
        gains[rows] = times[DEFAULT] / times[choice[rows]]
    torch.cuda.empty_cache()  # the timing graphs' pools
    picked = {rows: lib for rows, lib in choice.items() if lib != DEFAULT}
    log.info(
        "decode graphs' matmuls: %s",
        ", ".join(f"{lib} at {rows} rows ({gains[rows]:.3f}x)" for rows, lib in picked.items())
        or f"{DEFAULT} at every batch size",
    )
    return choice


def pick_skinny(blas_ms: float, skinny_ms: Mapping[SkinnyConfig, float]) -> SkinnyConfig | None:
    """The skinny kernel's fastest config, if it beats BLAS by ``SKINNY_MIN_GAIN``; else None
    (BLAS)."""
    if not skinny_ms:
        return None
    best = min(skinny_ms, key=skinny_ms.__getitem__)
    return best if blas_ms > skinny_ms[best] * SKINNY_MIN_GAIN else None


def choose_skinny(
    kinds: Mapping[str, Sequence[torch.Tensor]],
    library_for_size: Mapping[int, str],
    max_rows: int,
) -> dict[int, dict[str, SkinnyConfig]]:
    """Per decode batch size up to ``max_rows``, the kinds of projection (each kind's weights in
    layer order) whose skinny kernel, at the fastest of its candidate configs, ran their matmuls
    faster than the size's BLAS library by ``SKINNY_MIN_GAIN`` (``pick_skinny``), with that config;
    logged. A kind the kernel cannot run on this GPU (it fails to compile, to launch or to
    capture, whatever the error) stays on BLAS: the kernel is an optimisation, never a reason
    for the engine not to start."""
    from berth.kernels.skinny_matmul import CANDIDATES, skinny_matmul

    choice: dict[int, dict[str, SkinnyConfig]] = {}
    gains: dict[tuple[int, str], float] = {}
    for rows, library in library_for_size.items():
        if rows > max_rows:
            continue
        choice[rows] = {}
        for kind, weights in kinds.items():
            with preferred(library):
                blas = time_matmuls(weights, rows)
            try:
                times = {
                    config: time_matmuls(weights, rows, matmul=functools.partial(
                        skinny_matmul, config=config))
                    for config in CANDIDATES
                }  # fmt: skip
            except Exception as e:  # an optional kernel: any failure keeps BLAS
                log.warning(
                    "skinny kernel for %s at %d rows failed (%s): BLAS there", kind, rows, e
                )
                continue
            best = pick_skinny(blas, times)
            if best is not None:
                choice[rows][kind] = best
                gains[rows, kind] = blas / times[best]
    torch.cuda.empty_cache()  # the timing graphs' pools
    log.info(
        "decode graphs' skinny-kernel projections: %s",
        ", ".join(f"{kind} at {rows} rows ({gain:.3f}x)" for (rows, kind), gain in gains.items())
        or "none (BLAS everywhere)",
    )
    return choice
