"""l2sct's optional residual head on the MR pixels: the packed input is exact under windows and
flips, the head starts at zero, it trains, and a run with it predicts from files and from the
cache alike (a real tiny cache, encoded by a tiny VAE)."""

from __future__ import annotations

import numpy as np
import torch

from latent.app.predict_run import PredictOptions, load_run_and_vae, predict_dataset, predict_from_cache
from latent.core.io import read_volume
from latent.translate.models.base import build_model
from latent.translate.models.l2sct import depth_to_space, space_to_depth

from test_predict_run import runs  # noqa: F401 - the module fixture: phantom copy, tiny VAE, encoded cache

HEAD = {"family": "l2sct", "channels": [8, 8], "norm_num_groups": 4, "num_res_blocks": 1, "mr_head": True,
        "mr_head_channels": 4}


def test_packing_is_exact_and_mirrors_like_the_arrays(runs):  # noqa: F811
    pixels = torch.randn(2, 1, 8, 16, 24)
    assert space_to_depth(pixels).shape == (2, 64, 2, 4, 6) and torch.equal(depth_to_space(space_to_depth(pixels)), pixels)
    model = build_model({**HEAD, "vae": str(runs.vae_dir)})
    latent = torch.randn(2, 4, 2, 4, 6)
    packed = model.model_input({"mr_mu": latent, "mr_pixels": pixels})
    for dims in ((4,), (2, 3)):
        flipped = model.model_input({"mr_mu": latent.flip(dims), "mr_pixels": pixels.flip(dims)})
        assert torch.equal(model.mirror_input(packed, dims), flipped)
    # The head's last convolution starts at zero: the output is the exact decoder's.
    plain = build_model({**HEAD, "mr_head": False, "vae": str(runs.vae_dir)})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mr_head.")})
    assert torch.equal(model.eval().translate(packed), plain.eval().translate(latent))


def test_a_run_with_the_head_trains_and_predicts_from_files_and_cache_alike(runs, tmp_path):  # noqa: F811
    run_dir = runs.train("l2sct_head", {**HEAD, "lr": 1e-2}, max_steps=3, val_every=3)
    run, vae = load_run_and_vae(run_dir, str(runs.vae_dir), which="final")
    assert any(float(p.detach().abs().sum()) > 0 for p in run.model.mr_head[-1].parameters())  # the head learned
    pids = runs.splits["test"]
    from_files = predict_dataset(run, vae, runs.data, tmp_path / "files", pids=pids, quiet=True)
    from_cache = predict_from_cache(run, vae, runs.cache, tmp_path / "cache", pids=pids, quiet=True)
    for pid in pids:
        files_hu = read_volume(from_files.results[pid], dtype=np.float32)[0]
        cache_hu = read_volume(from_cache.results[pid], dtype=np.float32)[0]
        # float16 latents in the cache against a float32 re-encode: small differences only.
        assert np.abs(files_hu - cache_hu).mean() < 1.0, pid
    flipped = predict_dataset(run, vae, runs.data, tmp_path / "tta", pids=pids[:1], quiet=True,
                              options=PredictOptions(tta="flip"))
    assert not flipped.failures
