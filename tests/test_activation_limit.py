"""Large volumes: no convolution of the VAE may see a tensor of 2**31 elements or more.

Beyond INT_MAX elements per sample PyTorch sends a 3D convolution to its slow 64-bit path instead
of cuDNN. Everything about the released MAISI network here is measured on the meta device
(shapes only, nothing computed); the tiling itself runs on a tiny MAISI on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from latent.core.vae.loading import LAYOUT_MAISI, MAISI_CONFIG, LoadedVAE, build_vae
from latent.core.vae.inference import (
    ACTIVATION_HEADROOM,
    INT32_ELEMENTS,
    TILE_MARGIN,
    conv_activations,
    decode,
    encode_mu,
    largest_activation,
    plan_tiles,
    safe_tile,
)

#: MAISI layout, tiny channels: a CPU forward pass takes well under a second.
TINY_MAISI = {**MAISI_CONFIG, "num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}
FACTOR = 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread: the tiny CPU passes gain nothing from a second one on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loaded(network: torch.nn.Module, config: dict) -> LoadedVAE:
    return LoadedVAE(network, "test", "AutoencoderKlMaisi", dict(config), "0" * 64, LAYOUT_MAISI)


@pytest.fixture(scope="module")
def released_on_meta() -> LoadedVAE:
    """The released MAISI architecture with its parameters on the meta device (no memory, no init)."""
    with torch.device("meta"):
        network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, device="meta")
    return _loaded(network, dict(MAISI_CONFIG))


def _latent(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // FACTOR for s in shape)


# --------------------------------------------------------------------------- (a) the cause


def test_released_maisi_reaches_2_31_at_128x512x512_but_not_at_96x320x320(
    released_on_meta: LoadedVAE, record_property: pytest.RecordProperty
) -> None:
    big, small = (128, 512, 512), (96, 320, 320)
    encode_big = conv_activations(released_on_meta, big, "encode")
    # the first full-resolution activation: 64 channels x 128 x 512 x 512 = 2**31 exactly
    assert encode_big["encoder.blocks.0.conv.conv"] == 64 * math.prod(big) == INT32_ELEMENTS
    over = {name: size for name, size in encode_big.items() if size >= INT32_ELEMENTS}
    elements, name = largest_activation(released_on_meta, big, "encode")
    assert elements >= INT32_ELEMENTS and name in over
    decode_elements, decode_name = largest_activation(released_on_meta, _latent(big), "decode")
    assert decode_elements >= INT32_ELEMENTS  # the decoder's 128-channel full-resolution convolution
    print(f"\n128x512x512 encode: largest {elements} in {name}; at or over 2**31: {sorted(over)}")
    print(f"128x512x512 decode: largest {decode_elements} in {decode_name}")
    record_property("encode_128x512x512", f"{elements} {name}")
    record_property("decode_128x512x512", f"{decode_elements} {decode_name}")

    small_encode, small_encode_name = largest_activation(released_on_meta, small, "encode")
    small_decode, small_decode_name = largest_activation(released_on_meta, _latent(small), "decode")
    print(f"96x320x320: encode {small_encode} in {small_encode_name}, decode {small_decode} in {small_decode_name}")
    assert small_encode < INT32_ELEMENTS and small_decode < INT32_ELEMENTS


# --------------------------------------------------------------------------- (b) the rule


def _monai_starts(size: int, window: int, step: int) -> list[int]:
    """Window starts along one axis as MONAI's ``dense_patch_slices`` places them (last one clamped)."""
    from monai.data.utils import dense_patch_slices

    return sorted({s[0].start for s in dense_patch_slices((size,), (window,), (step,))})


@pytest.mark.parametrize("part", ["encode", "decode"])
@pytest.mark.parametrize("shape", [(128, 512, 512), (164, 608, 608), (96, 320, 320)])
def test_chosen_plan_keeps_every_convolution_under_2_31_at_little_extra_work(
    released_on_meta: LoadedVAE, shape: tuple[int, int, int], part: str
) -> None:
    plan = plan_tiles(released_on_meta, shape, part)
    budget = INT32_ELEMENTS * ACTIVATION_HEADROOM

    def largest(image_window: tuple[int, ...]) -> int:
        spatial = image_window if part == "encode" else _latent(image_window)
        return max(conv_activations(released_on_meta, spatial, part).values())

    if shape == (96, 320, 320):
        assert plan is None and safe_tile(released_on_meta, shape, part) is None and largest(shape) < budget
        return
    assert plan is not None and largest(shape) >= INT32_ELEMENTS
    assert plan.window == safe_tile(released_on_meta, shape, part)
    assert all(w % FACTOR == 0 and 0 < w <= s for w, s in zip(plan.window, shape))
    assert largest(plan.window) < budget < INT32_ELEMENTS
    for size, window, count, step in zip(shape, plan.window, plan.counts, plan.steps):
        starts = _monai_starts(size, window, step)
        assert len(starts) == count and starts[0] == 0 and starts[-1] + window == size  # covers the axis
        assert all(b - a == step for a, b in zip(starts, starts[1:-1]))
        if count > 1:  # neighbours share at least the margin, less the rounding to whole latent voxels
            assert min(a + window - b for a, b in zip(starts, starts[1:])) >= TILE_MARGIN - FACTOR
    # the SynthRAD-size slab costs at most 1.25x the voxels of one pass (the cost of a margin of
    # TILE_MARGIN on one or two split axes); the decoder's wider layers need more windows
    ratio = plan.voxel_ratio(shape)
    assert ratio <= (1.25 if shape == (128, 512, 512) else 1.35)
    print(f"\n{shape} {part}: {plan}, {ratio:.3f}x the voxels, largest {largest(plan.window)}")


# --------------------------------------------------------------------------- (c) the tiling path


def _smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(s // 4 for s in shape), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)


def _check_automatic_tiling(vae: LoadedVAE, data: torch.Tensor, image_shape: tuple[int, ...], part: str) -> None:
    """Around the lowered limit: one exact untiled pass just above it, the rule's windows just below."""
    run = encode_mu if part == "encode" else decode
    spatial = image_shape if part == "encode" else _latent(image_shape)
    elements, _ = largest_activation(vae, spatial, part)
    untiled = run(vae, data)

    roomy = math.ceil((elements + 1) / ACTIVATION_HEADROOM) + 1  # the volume just fits one window
    assert safe_tile(vae, image_shape, part, limit=roomy) is None
    torch.testing.assert_close(run(vae, data, activation_limit=roomy), untiled, rtol=0, atol=0)

    tight = elements  # the volume no longer fits: windows chosen by the rule
    plan = plan_tiles(vae, image_shape, part, limit=tight)
    assert plan is not None and plan.window != image_shape and all(w % FACTOR == 0 for w in plan.window)
    tiled = run(vae, data, activation_limit=tight)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    torch.testing.assert_close(run(vae, data, activation_limit=tight), tiled, rtol=0, atol=0)  # deterministic
    assert not torch.equal(tiled, untiled)  # GroupNorm statistics differ per window


def test_automatic_tiling_runs_under_a_lowered_limit_and_is_exact_when_the_volume_fits() -> None:
    torch.manual_seed(0)
    vae = _loaded(build_vae("AutoencoderKlMaisi", TINY_MAISI), TINY_MAISI)
    volume = _smooth_volume((16, 32, 32))
    image_shape = tuple(volume.shape[2:])
    _check_automatic_tiling(vae, volume, image_shape, "encode")
    _check_automatic_tiling(vae, encode_mu(vae, volume), image_shape, "decode")
