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
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import BeforeValidator

from latent.core.errors import BadConfigError

logger = logging.getLogger(__name__)

Precision = Literal["no", "bf16", "fp16", "auto"]


def _yaml_no(value: Any) -> Any:
    """YAML reads a bare ``no`` as False: the precision field takes it as ``"no"``."""
    return "no" if value is False else value


#: The ``mixed_precision`` field of the training configs (a bare YAML ``no`` accepted).
MixedPrecision = Annotated[Precision, BeforeValidator(_yaml_no)]


#: 3D convolution shapes (channels, depth, height, width) the bf16 self-test checks: a depth of
#: 2 is where one CPU kernel has been seen to return wrong weight gradients (docs/models.md,
#: section "bf16 on a CPU").
BF16_SELF_TEST_SHAPES = ((32, 2, 4, 4), (64, 2, 8, 8), (32, 4, 8, 8))
#: Largest relative error (L2) of a bf16 result against float32 that the self-test accepts
#: (correct kernels land near 0.004).
BF16_SELF_TEST_TOLERANCE = 0.05


def bf16_conv3d_error(shapes: tuple[tuple[int, int, int, int], ...] = BF16_SELF_TEST_SHAPES) -> float:
    """Worst relative error of CPU bf16-autocast 3D convolutions against float32.

    Each shape runs a 3x3x3 convolution forward and backward in both precisions; the error is
    the largest relative L2 difference of the output, the input gradient and the weight gradient
    (``inf`` when the bf16 result is not finite).

    The test is deterministic and leaves the process's random stream as it found it: it runs
    between ``set_seed`` and the model's initialisation, so drawing from the global generator
    would make the initial weights depend on the CPU (and on how soon the test stops).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _worst_bf16_conv3d_error(shapes)


def _worst_bf16_conv3d_error(shapes: tuple[tuple[int, int, int, int], ...]) -> float:
    """:func:`bf16_conv3d_error` on the current random stream."""
    worst = 0.0
    for channels, *spatial in shapes:
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
        inputs = torch.randn(1, channels, *spatial)
        results = []
        for bf16 in (False, True):
            conv.zero_grad()
            x = inputs.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                output = conv(x)
            output.float().square().mean().backward()
            results.append((output.detach().float(), x.grad, conv.weight.grad.clone()))
        for low, reference in zip(results[1], results[0]):
            if not torch.isfinite(low).all():
                return float("inf")
            worst = max(worst, float((low - reference).norm() / reference.norm().clamp_min(1e-12)))
    return worst


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 arithmetic (AVX512-BF16 or AMX) that computes correctly.

    On AVX2 alone bf16 convolutions fall back to a reference kernel about 100x slower than
    float32; with AMX / AVX512-BF16 they run faster than float32. The instruction set alone is
    not enough: :func:`bf16_conv3d_error` must stay within ``BF16_SELF_TEST_TOLERANCE``, and a
    CPU whose bf16 kernels fail it is logged and treated as having no usable bf16.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return False
    error = bf16_conv3d_error()
    if error > BF16_SELF_TEST_TOLERANCE:
        logger.warning("bf16 self-test failed on this CPU: 3D convolutions in bf16 differ from float32 by "
                       "%.3g (relative); mixed_precision auto runs float32", error)
        return False
    return True


def resolve_precision(requested: str, *, on_gpu: bool | None = None,
                      cpu_probe: Callable[[], bool] | None = None,
                      cpu_bf16_error: Callable[[], float] | None = None) -> str:
    """The mixed-precision mode to run: ``auto`` resolved, a slow bf16 request warned about.

    Args:
        requested: ``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a CUDA device with
            bf16, or on a CPU with native bf16 that passes the self-test; ``"no"`` elsewhere).
        on_gpu: whether training runs on CUDA (default: ``torch.cuda.is_available()``).
        cpu_probe: the CPU capability probe (default :func:`cpu_has_fast_bf16`).
        cpu_bf16_error: the CPU bf16 self-test an explicit ``bf16`` must pass (default
            :func:`bf16_conv3d_error`).

    Returns:
        ``"no"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        ValueError: an unknown mode, or ``bf16`` on a CPU whose bf16 convolutions fail the self-test.
    """
    if requested not in ("no", "bf16", "fp16", "auto"):
        raise ValueError(f"mixed_precision: expected no, bf16, fp16 or auto, got {requested!r}")
    if requested in ("no", "fp16"):
        return requested
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if requested == "bf16" and not on_gpu:
        error = (bf16_conv3d_error if cpu_bf16_error is None else cpu_bf16_error)()
        if error > BF16_SELF_TEST_TOLERANCE:
            raise BadConfigError(f"mixed_precision: bf16 3D convolutions on this CPU differ from float32 by {error:.3g} "
                             "(relative, self-test); use 'auto' or 'no'")
    probe = cpu_has_fast_bf16 if cpu_probe is None else cpu_probe
    fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else probe()
    if requested == "auto":
        return "bf16" if fast_bf16 else "no"
    if not fast_bf16:
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
