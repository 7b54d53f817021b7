"""One way to build the Hugging Face Accelerator, for every training loop in a process.

Accelerate keeps its mixed-precision choice in a process-wide ``AcceleratorState``: a second
``Accelerator`` asking for another precision raises ``AcceleratorState has already been
initialized``. The demo runs several loops in one process (VAE fit, then each translation
recipe), so every loop builds its Accelerator here: ``auto`` is resolved by one probe
(:func:`resolve_precision`), and when an earlier loop in this process fixed another precision
the state is reset while the process group (``PartialState``) is kept.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import torch

logger = logging.getLogger(__name__)

Precision = Literal["no", "bf16", "fp16", "auto"]


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 arithmetic (AVX512-BF16 or AMX).

    On AVX2 alone bf16 convolutions fall back to a reference kernel about 100x slower than
    float32; with AMX / AVX512-BF16 they run faster than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, *, on_gpu: bool | None = None,
                      cpu_probe: Callable[[], bool] | None = None) -> str:
    """The mixed-precision mode to run: ``auto`` resolved, a slow bf16 request warned about.

    Args:
        requested: ``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a CUDA device with
            bf16, or on a CPU with native bf16; ``"no"`` elsewhere).
        on_gpu: whether training runs on CUDA (default: ``torch.cuda.is_available()``).
        cpu_probe: the CPU capability probe (default :func:`cpu_has_fast_bf16`).

    Returns:
        ``"no"``, ``"bf16"`` or ``"fp16"``.
    """
    if requested not in ("no", "bf16", "fp16", "auto"):
        raise ValueError(f"mixed_precision: expected no, bf16, fp16 or auto, got {requested!r}")
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    probe = cpu_has_fast_bf16 if cpu_probe is None else cpu_probe
    fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else probe()
    if requested == "auto":
        return "bf16" if fast_bf16 else "no"
    if requested == "bf16" and not fast_bf16:
        logger.warning("mixed_precision bf16 on a %s without fast bf16: expect it to be much slower than "
                       "float32 (use 'auto' or 'no')", "GPU" if on_gpu else "CPU")
    return requested


def make_accelerator(mixed_precision: str, *, cpu: bool = False, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` with ``mixed_precision`` resolved by :func:`resolve_precision`.

    Args:
        mixed_precision: requested mode (``auto`` allowed).
        cpu: run on the CPU even when CUDA is available. Without CUDA the Accelerator is always
            told it runs on CPU (only then does it form a gloo process group under a launcher).
        **kwargs: passed to ``Accelerator`` (gradient accumulation, trackers, handlers...).

    Returns:
        The Accelerator; ``accelerator.mixed_precision`` is the resolved mode.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    on_cpu = cpu or not torch.cuda.is_available()
    resolved = resolve_precision(mixed_precision, on_gpu=not on_cpu)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", resolved) != resolved:
        # An earlier loop of this process fixed another precision: reset that choice only (the
        # distributed PartialState, i.e. the process group, is kept).
        logger.info("mixed precision %s -> %s for this loop", state.get("_mixed_precision"), resolved)
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=on_cpu, mixed_precision=resolved, **kwargs)
