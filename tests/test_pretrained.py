"""Generator.from_pretrained on a diffusers-format folder in miniature, plus a Self-Forcing checkpoint."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from packcache import Generator, PresetError, WeightsError
from packcache.presets import get_preset
from test_text import _save_umt5_folder
from test_weights import to_original

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-mini")
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY.transformer.diffusers_kwargs()).save_pretrained(root / "transformer")
    AutoencoderKLWan(**TINY.vae.diffusers_kwargs()).save_pretrained(root / "vae")
    _save_umt5_folder(root)
    return root


def test_folder_streams_frames(folder):
    gen = Generator.from_pretrained(folder, device="cpu", height=64, width=64)
    assert gen.preset.transformer.num_layers == TINY.transformer.num_layers
    with gen.open("a red circle moves left") as s:
        frames = [s.next_chunk() for _ in range(2)]
    assert frames[1].shape == (12, 64, 64, 3) and frames[1].dtype == np.uint8


def test_self_forcing_checkpoint_replaces_transformer_weights(folder, tmp_path):
    torch.manual_seed(1)
    other = WanTransformer3DModel(**TINY.transformer.diffusers_kwargs())
    ckpt = {"generator_ema": {"model." + k: v for k, v in to_original(other.state_dict()).items()}}
    torch.save(ckpt, tmp_path / "self_forcing.pt")
    gen = Generator.from_pretrained(folder, checkpoint=tmp_path / "self_forcing.pt", device="cpu",
                                    height=64, width=64)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(gen.model.transformer.state_dict()[k], v)


def test_pretrained_errors_are_clear(folder, tmp_path):
    with pytest.raises(WeightsError, match="HR"):
        Generator.from_pretrained(folder, compression="hr+lr")
    with pytest.raises(WeightsError):
        Generator.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(PresetError, match="multiples"):
        Generator.from_pretrained(folder, height=70, width=64)
