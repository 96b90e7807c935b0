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


@pytest.mark.parametrize("setting", ["no_such_field=1", "fg_weight=heavy", "fg_weight"])
def test_cli_refuses_a_bad_recipe_setting_before_any_work(tmp_path, capsys, setting):
    from toyworld.patch_probe import main

    with pytest.raises(SystemExit) as exc:
        main(["--work", str(tmp_path / "w"), "train", "p2x", "--set", setting])
    assert exc.value.code == 2
    assert f"--set {setting!r}" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_halved_positions_put_four_patch1_tokens_around_their_patch2_token_and_are_undone():
    import packcache.model as model_module
    from toyworld.patch_probe import spatial_positions

    before = model_module.grid_positions(1, 2, 2)
    with spatial_positions("p1h"):
        halved = model_module.grid_positions(1, 4, 4)                   # one frame, 4x4 patch-1 tokens
    with spatial_positions("p1"):                                       # integer grid: unchanged
        assert torch.equal(model_module.grid_positions(1, 2, 2), before)
    assert torch.equal(model_module.grid_positions(1, 2, 2), before)    # restored on exit
    coarse = before.reshape(2, 2, -1)[..., 1:]                          # (y, x) of the 2x2 patch-2 tokens
    fine = halved.reshape(4, 4, -1)[..., 1:]
    for y in range(4):
        for x in range(4):
            assert torch.allclose((fine[y, x] - coarse[y // 2, x // 2]).abs(), torch.tensor([0.25, 0.25],
                                                                                          dtype=fine.dtype))


def test_an_arm_starts_from_the_shipped_dit_with_its_table_or_a_fresh_one_or_none(tmp_path):
    from toyworld import patch_probe as P
    from toyworld import train as T
    for name, setup in (("spatial", T.Setup(world="placed", spatial_embedding=True)),
                        ("plain", T.Setup(world="varied", spatial_embedding=False))):
        (tmp_path / name).mkdir()
        setup.save(tmp_path / name)
    bundle = P.shipped_bundle()
    dit = {k: v for k, v in bundle.items() if k.startswith("transformer.")}
    table = "transformer.spatial_embedding"
    assert tuple(dit[table].shape[3:]) == (4, 4)                        # the shipped DiT's own (session 16)
    state = P.arm_init("p2", bundle, tmp_path / "spatial")
    assert all(torch.equal(state[k], v) for k, v in dit.items())
    fresh = P.arm_init("p2", {k: v for k, v in bundle.items() if k != table}, tmp_path / "spatial")
    assert fresh[table].shape == dit[table].shape and fresh[table].abs().max() > 0
    assert not torch.equal(fresh[table], dit[table])
    assert set(P.arm_init("p2", bundle, tmp_path / "plain")) == set(dit) - {table}     # an arm without a table
