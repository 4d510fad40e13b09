"""MAE, the masked-image-modelling baseline (mae.py, train.py --task mae): exact masking, a loss on the removed
patches only, learning, and its encoder in both probes."""
import json

import pytest
import torch
from torch.testing import assert_close

import eval as ev
import finola
import mae
import train
import weights


def tiny_mae(ratio=0.75, patch=8):
    torch.manual_seed(0)
    encoder = mae.ViT(mae.ViTConfig(patch=patch, width=32, depth=2, heads=4))
    return mae.MAE(encoder, mae.MAEConfig(mask_ratio=ratio, decoder_width=16, decoder_depth=1, decoder_heads=2))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_exactly_the_mask_ratio_of_patches_is_removed_per_image(ratio):
    model = tiny_mae(ratio)
    x = torch.rand(6, 3, 64, 64)
    prediction, target, mask = model(x, generator=torch.Generator().manual_seed(1))
    assert prediction.shape == target.shape == (6, 64, 3 * 8 * 8) and mask.shape == (6, 64)
    assert (mask.sum(1) == round(64 * ratio)).all(), "the same exact count in every image"
    assert len({tuple(m.tolist()) for m in mask}) == 6, "each image draws its own patches"
    again = model(x, generator=torch.Generator().manual_seed(1))[2]
    assert torch.equal(mask, again), "the generator fixes the draw"


def test_the_encoder_sees_only_the_kept_patches():
    """Changing a removed patch's pixels changes nothing the encoder computes: the prediction of a model whose decoder
    only sees the encoder moves only through the target."""
    model = tiny_mae().eval()
    x = torch.rand(2, 3, 64, 64)
    prediction, _, mask = model(x, generator=torch.Generator().manual_seed(3))
    patches = mae.patchify(x, 8)
    changed = finola.fold_patches(torch.where(mask[..., None], torch.rand_like(patches), patches), (8, 8), 8)
    again, _, _ = model(changed, generator=torch.Generator().manual_seed(3))
    assert_close(again, prediction, rtol=1e-5, atol=1e-6)


def test_the_loss_counts_only_removed_patches_against_normalized_targets():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 10, 12, generator=g), torch.randn(3, 10, 12, generator=g)
    mask = torch.rand(3, 10, generator=g) < 0.6
    slow = [((prediction[b, n] - target[b, n]) ** 2).mean() for b in range(3) for n in range(10) if mask[b, n]]
    assert_close(mae.loss(prediction, target, mask), torch.stack(slow).mean())
    visible = prediction.clone().requires_grad_(True)
    mae.loss(visible, target, mask).backward()
    assert (visible.grad[~mask] == 0).all() and (visible.grad[mask] != 0).any()
    model = tiny_mae()
    x = torch.rand(2, 3, 64, 64)
    t = model.target(x)
    assert_close(t.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    assert_close(mae.patchify(x, 8)[0, 5], x[0, :, 0:8, 40:48].reshape(-1), msg="row-major (3, p, p) patches")
    assert_close(finola.fold_patches(mae.patchify(x, 8), (8, 8), 8), x, rtol=0, atol=0)


def test_a_few_steps_lower_the_loss_below_each_patch_s_mean_colour():
    """On smooth images (random 4 x 4 colours, bilinear to 32 x 32), where a patch is predictable from its
    neighbours (noise would leave MAE's normalized target unpredictable), 60 steps on one batch take the loss from
    above to clearly below that of predicting each removed patch as its mean colour (0 in the normalized target)."""
    model = tiny_mae()
    small = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, baselines = [], []
    for step in range(60):
        prediction, target, mask = model(x, generator=torch.Generator().manual_seed(step % 3))
        loss = mae.loss(prediction, target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        baselines.append(mae.loss(torch.zeros_like(target), target, mask).item())
    assert losses[0] > baselines[0] and sum(losses[-3:]) < 0.9 * sum(baselines[-3:]), (losses, baselines)


def test_bad_configs_and_inputs_name_the_argument():
    with pytest.raises(ValueError, match="mask_ratio: expected a fraction"):
        mae.MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="patch side 8"):
        tiny_mae()(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="unknown ViT"):
        mae.create("vit-huge")


def test_mae_trains_and_its_encoder_loads_into_both_probes(folder, tmp_path, capsys):
    common = ["--data", str(folder), "--image-size", "32", "--batch-size", "5", "--max-steps", "2", "--log-every", "1",
              "--crop-ratio", "1", "--no-augment"]
    pre = tmp_path / "mae"
    train.main(["--task", "mae", *common, "--grid", "4", "--out", str(pre)])
    final = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()][-1]["final"]
    assert final["images"] == 9 and 0 <= final["patch_mean_loss"] and final["mae_loss"] > 0
    model = weights.load_model(pre / "model.safetensors")
    assert weights.arch_of(model) == "mae" and model.encoder.config.patch == 8 and model.config.mask_ratio == 0.75
    capsys.readouterr()
    result = ev.main(["mae", "--weights", str(pre / "model.safetensors"), "--out", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert {k: result[k] for k in final} == final, "the same fixed draw as the run's final evaluation"
    encoder = model.encoder.state_dict()
    for task in ("linprobe", "tran1-probe"):
        train.main(["--task", task, *common, "--init", str(pre / "model.safetensors"), "--out", str(tmp_path / task)])
        probe = weights.load_model(tmp_path / task / "model.safetensors")
        assert isinstance(probe.encoder, mae.ViT) and probe.config.frozen
        assert all(torch.equal(v, encoder[k]) for k, v in probe.encoder.state_dict().items()), f"{task}: frozen"
