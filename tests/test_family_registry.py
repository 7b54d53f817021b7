"""Families register by their file alone: a dummy family added as one module (plus its recipe)
is built, trained by the shared loop, saved, loaded and listed by the bench, with no other file
changed (docs/architecture.md, "Where a change goes")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

import latent.translate.models as family_package
from latent.app.bench.config import learned_methods, parse_methods, samples_per_case
from latent.core.errors import BadConfigError
from latent.translate.models.base import load_pretrained, model_class, model_families, translating_families
from latent.translate.train import load_config, train

DUMMY = '''
"""A dummy family: CT latent = a learned scale x MR latent."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from latent.translate.models.base import ModelConfig, TranslationModel


class DummyScaleConfig(ModelConfig):
    family: Literal["dummy_scale"] = "dummy_scale"


class DummyScale(TranslationModel):
    """One learned scale."""

    family: ClassVar[str] = "dummy_scale"
    config_class: ClassVar[type[DummyScaleConfig]] = DummyScaleConfig
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_mu")

    def __init__(self, config: DummyScaleConfig) -> None:
        super().__init__(config)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, batch, phase="main"):
        return {"loss": (self.scale * batch["mr_mu"] - batch["ct_mu"]).abs().mean()}

    @torch.no_grad()
    def translate(self, inputs, generator=None):
        return self.scale * inputs
'''


@pytest.fixture()
def dummy_family(tmp_path: Path, monkeypatch):
    """The dummy family's one file, in a folder added to the family package's search path."""
    folder = tmp_path / "families"
    folder.mkdir()
    (folder / "dummy_scale.py").write_text(DUMMY)
    monkeypatch.setattr(family_package, "__path__", [*family_package.__path__, str(folder)])
    yield "dummy_scale"
    sys.modules.pop("latent.translate.models.dummy_scale", None)


class ToyLatents(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        mr = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(index))
        return {"pid": f"toy{index}", "mr_mu": mr, "ct_mu": 0.5 * mr}


def test_a_family_is_one_file_and_its_recipe(dummy_family: str, tmp_path: Path) -> None:
    assert dummy_family in model_families() and dummy_family in translating_families()
    assert dummy_family in learned_methods()  # the bench derives its learned set from the classes
    assert parse_methods(f"water,{dummy_family}+tta") == ("water", f"{dummy_family}+tta")
    assert samples_per_case(dummy_family, 4) == 1  # not stochastic: one sample
    recipe = tmp_path / "dummy_scale_demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"family": dummy_family, "lr": 0.05}, "data": {"batch_size": 2}, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 20, "log_every": 5, "checkpoint_every": 20, "val_every": 20, "tensorboard": False}}))
    run = train(load_config(str(recipe)), train_dataset=ToyLatents(), val_dataset=ToyLatents(), quiet=True)
    model = load_pretrained(run / "final")
    assert type(model).family == dummy_family
    assert 0.3 < float(model.scale.detach()) < 0.7  # learned towards 0.5 from 0


def test_the_registry_knows_the_shipped_families_and_refuses_others() -> None:
    families = model_families()
    for name in ("l2sct", "l2l_regress", "l2l_ddim", "l2l_controlnet", "decoder_adapt", "pix2pix", "cyclegan", "cut",
                 "regress3d", "resvit"):
        assert families[name].family == name
    assert "decoder_adapt" not in translating_families()  # it reads CT latents: no MR -> CT method
    assert "base" not in families and "gan_common" not in families  # helper modules are no family
    assert samples_per_case("l2l_ddim", 4) == 4 and samples_per_case("l2sct", 4) == 1
    with pytest.raises(BadConfigError, match=r"unknown model family 'base'; known: .*l2sct"):
        model_class("base")
    with pytest.raises(BadConfigError, match=r"unknown model family '\.\./x'"):
        model_class("../x")


def test_the_controlnet_takes_its_prior_run_folder_or_its_final(tmp_path: Path) -> None:
    from latent.translate.models.l2l_controlnet import prior_folder

    (tmp_path / "prior" / "final").mkdir(parents=True)
    (tmp_path / "prior" / "final" / "config.json").write_text("{}")
    assert prior_folder(str(tmp_path / "prior")) == tmp_path / "prior" / "final"
    assert prior_folder(str(tmp_path / "prior" / "final")) == tmp_path / "prior" / "final"
