"""toyworld.patch_probe: moving a patch-1x2x2 DiT to patch 1x1x1 keeps what each token embeds and what the head
draws (issue 16's patch probe), and the CLI refuses arms it does not know in one line."""

import pytest
import torch

from packcache.presets import get_preset


def test_transfer_to_patch1_embeds_and_draws_as_the_patch2_model():
    from toyworld.patch_probe import patch1_preset, transfer_to_patch1
    from toyworld.train import build_model

    tiny = get_preset("tiny")
    p2 = build_model(tiny, 3)
    p1 = build_model(patch1_preset(tiny), 4)
    p1.load_state_dict(transfer_to_patch1(p2.state_dict()))      # strict: every key and shape fits

    # a latent constant over each 2x2 patch: each of the four patch-1 tokens embeds as the patch-2 token
    coarse = torch.randn(1, 16, 3, 4, 4)
    fine = coarse.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    e2 = p2.transformer.patch_embedding(fine)                            # (1, dim, 3, 4, 4)
    e1 = p1.transformer.patch_embedding(fine)                            # (1, dim, 3, 8, 8)
    assert torch.allclose(e1, e2.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4), atol=1e-5)

    # the same hidden state: the patch-1 head draws the mean of the patch-2 head's four sub-pixels, per channel
    h = torch.randn(5, p2.dim)
    out2 = p2.transformer.proj_out(h).reshape(5, 1, 2, 2, 16)           # (pt, ph, pw, channel), as model._head
    out1 = p1.transformer.proj_out(h)
    assert torch.allclose(out1, out2.mean(dim=(1, 2, 3)), atol=1e-5)
    assert not torch.allclose(out1, out2[:, 0, 0, 0], atol=1e-3)          # not one sub-pixel's output


def test_transfer_refuses_a_model_that_is_not_patch2():
    from toyworld.patch_probe import patch1_preset, transfer_to_patch1
    from toyworld.train import build_model

    p1 = build_model(patch1_preset(get_preset("tiny")), 0)
    with pytest.raises(ValueError, match="1x2x2"):
        transfer_to_patch1(p1.state_dict())


@pytest.mark.parametrize("argv", [["eval", "p3"], ["train"], ["train", "shipped"], ["train", "p1", "p2"]])
def test_cli_refuses_unknown_or_missing_arms_in_one_line(tmp_path, capsys, argv):
    from toyworld.patch_probe import main

    assert main(["--work", str(tmp_path / "w"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: arms are") and "\n" not in err
    assert not (tmp_path / "w").exists()                                  # refused before any work
