"""Masked FINOLA (masked.py): the masking geometry, Masked-B's partitions and block offsets on hand-worked grids, the
decoders, the two models, and train.py --task masked-e / masked-b plus App. D's frozen-encoder reconstruction."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import eval as ev
import finola
import masked
import mobileformer
import train
import weights


# --- the masking geometry ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (8, 4), (16, 16)])
def test_sampled_blocks_lie_inside_and_reach_every_position(grid):
    blocks = masked.sample_blocks(4000, grid, generator=torch.Generator().manual_seed(0))
    bh, bw = grid[0] // 2, grid[1] // 2
    assert blocks.min() >= 0 and (blocks[:, 0] <= grid[0] - bh).all() and (blocks[:, 1] <= grid[1] - bw).all()
    assert len({tuple(b) for b in blocks.tolist()}) == (grid[0] - bh + 1) * (grid[1] - bw + 1)
    assert masked.centred_blocks(2, grid).tolist() == [[grid[0] // 4, grid[1] // 4]] * 2


@pytest.mark.parametrize("block", [(0, 0), (2, 2), (0, 2), (1, 0), (4, 3)])
def test_loss_mask_is_exactly_everything_outside_the_block(block):
    grid, p = (8, 6), 3
    mask = masked.loss_mask(torch.tensor([block]), grid, patch=p)[0, 0]
    expected = torch.ones(grid[0] * p, grid[1] * p, dtype=torch.bool)
    r, c = block
    expected[r * p:(r + 4) * p, c * p:(c + 3) * p] = False
    assert torch.equal(mask, expected)
    assert mask.sum() == mask.numel() * 3 // 4, "a quadrant-size block leaves three quarters masked"


def test_crop_is_the_block_of_each_image_and_masked_mse_ignores_the_block():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    blocks = torch.tensor([[0, 0], [2, 1], [1, 2]])
    crops = masked.crop_blocks(x, blocks, patch=8)
    for b, (r, c) in enumerate(blocks.tolist()):
        assert torch.equal(crops[b], x[b, :, r * 8:r * 8 + 16, c * 8:c * 8 + 16])
    mask = masked.loss_mask(blocks, (4, 4), patch=8)
    y = torch.where(mask, x, torch.rand_like(x))  # wrong only on the visible blocks
    assert masked.masked_mse(y, x, mask).item() == 0.0
    assert_close(masked.masked_mse(x + 0.5 * mask, x, mask), torch.tensor(0.25))


def test_blocks_outside_the_grid_are_refused():
    with pytest.raises(ValueError, match="blocks: every 2x2 block must lie inside the 4x4 grid"):
        masked.loss_mask(torch.tensor([[3, 0]]), (4, 4), patch=2)
    with pytest.raises(ValueError, match="grid: expected even sides"):
        masked.sample_blocks(1, (5, 4))


# --- Masked-B's partitions and block offsets (hand-worked; the map is separable: rows x columns) -----------------

# (grid side, block's top-left along the axis) -> per cell: half (partition index along the axis), block offset,
# source cell on the grid. Sub-blocks are side/4 cells; the block covers side/2 cells.
AXES = {
    # 4 cells, block at 0 (first corner): cell 0 is sub-block 0 itself; cells 1-3 belong to sub-block 1 (cell 1),
    # one block step per cell.
    (4, 0): ([0, 1, 1, 1], [0, 0, 1, 2], [0, 1, 1, 1]),
    # 4 cells, block at 2 (last corner): mirror image, the first partition reaches back two block steps.
    (4, 2): ([0, 0, 0, 1], [-2, -1, 0, 0], [2, 2, 2, 3]),
    # 4 cells, centred block (1): each partition is 2 cells: the paper's case, offsets -1 / +1.
    (4, 1): ([0, 0, 1, 1], [-1, 0, 0, 1], [1, 1, 2, 2]),
    # 8 cells, centred block (2, 2-cell sub-blocks): rows 0-1 copy rows 2-3 one block up, rows 6-7 copy 4-5 one down.
    (8, 2): ([0, 0, 0, 0, 1, 1, 1, 1], [-1, -1, 0, 0, 0, 0, 1, 1], [2, 3, 2, 3, 4, 5, 4, 5]),
    # 8 cells, block at the edge (0): the far partition holds three tiles of the sub-block at cells 2-3.
    (8, 0): ([0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 2, 3, 2, 3]),
    # 8 cells, block at 1 (off the 2-cell tiling): tiles stay aligned to the sub-blocks, cut by the border.
    (8, 1): ([0, 0, 0, 1, 1, 1, 1, 1], [-1, 0, 0, 0, 0, 1, 1, 2], [2, 1, 2, 3, 4, 3, 4, 3]),
}


@pytest.mark.parametrize("rows,cols", [((4, 0), (4, 0)), ((4, 2), (4, 2)), ((4, 1), (4, 1)), ((4, 0), (4, 2)),
                                       ((8, 2), (8, 2)), ((8, 0), (8, 2)), ((8, 1), (8, 0)), ((4, 2), (8, 1))])
def test_offset_map_on_hand_worked_grids(rows, cols):
    (gh, r0), (gw, c0) = rows, cols
    where = masked.offset_map(torch.tensor([[r0, c0]]), (gh, gw))
    i, v, src_r = (torch.tensor(t)[:, None].expand(gh, gw) for t in AXES[rows])
    j, u, src_c = (torch.tensor(t)[None, :].expand(gh, gw) for t in AXES[cols])
    expected = {"partition": 2 * i + j, "v": v, "u": u, "source_row": src_r, "source_col": src_c,
                "row": src_r - r0 - i * (gh // 4), "col": src_c - c0 - j * (gw // 4)}
    for key, value in expected.items():
        assert torch.equal(where[key][0], value), key


def test_blockwise_map_is_eq3_from_each_cells_source():
    torch.manual_seed(0)
    C, grid = 8, (8, 8)
    params = {k: torch.randn(C, C) * 0.3 for k in finola.KEYS}
    feats = torch.randn(3, C, 4, 4)
    blocks = torch.tensor([[0, 0], [4, 1], [2, 2]])  # different blocks in one batch
    z = masked.blockwise_map(params, feats, blocks, grid)
    where = masked.offset_map(blocks, grid)
    for b in range(3):
        for r in range(8):
            for c in range(8):
                src = feats[b:b + 1, :, where["source_row"][b, r, c] - blocks[b, 0],
                            where["source_col"][b, r, c] - blocks[b, 1]]
                ref = finola.shift(params, src, int(where["u"][b, r, c]), int(where["v"][b, r, c]))
                assert_close(z[b, :, r, c], ref[0], msg=f"image {b}, cell {(r, c)}")
        r0, c0 = blocks[b].tolist()
        assert torch.equal(z[b, :, r0:r0 + 4, c0:c0 + 4], feats[b]), "the visible cells keep the encoder's features"


@pytest.mark.parametrize("poisoned,finite_where", [("A", lambda u, v: u <= 0), ("A_neg", lambda u, v: u >= 0),
                                                   ("B", lambda u, v: v <= 0), ("B_neg", lambda u, v: v >= 0)])
@pytest.mark.parametrize("block", [(1, 1), (0, 2), (2, 0)])
def test_each_matrix_serves_only_its_direction(poisoned, finite_where, block):
    """A steps right, A_neg left, B down, B_neg up (Eq. 3): a NaN matrix reaches exactly the cells of its direction."""
    C, grid = 4, (4, 4)
    params = {k: torch.randn(C, C) * 0.3 for k in finola.KEYS}
    params[poisoned] = torch.full((C, C), float("nan"))
    blocks = torch.tensor([block])
    z = masked.blockwise_map(params, torch.randn(1, C, 2, 2), blocks, grid)
    where = masked.offset_map(blocks, grid)
    assert torch.equal(z[0].isfinite().all(0), finite_where(where["u"][0], where["v"][0]))


# --- decoders -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transformer_upsampler_is_permutation_equivariant(seed):
    torch.manual_seed(seed)
    up = masked.TransformerUpsampler(16, patch=2, width=32, depth=2, heads=4).eval()
    z = torch.randn(2, 16, 3, 4)
    perm = torch.randperm(12)
    z_perm = z.flatten(2)[:, :, perm].reshape(2, 16, 3, 4)
    assert_close(up.patches(z_perm), up.patches(z)[:, perm], rtol=1e-5, atol=1e-5)
    assert up(z).shape == (2, 3, 6, 8)


def test_linear_upsampler_maps_each_token_to_its_own_patch():
    torch.manual_seed(0)
    up = finola.LinearUpsampler(8, patch=4)
    z = torch.randn(1, 8, 2, 3)
    y = up(z)
    z2 = z.clone()
    z2[0, :, 1, 2] += 1
    changed = (up(z2) != y).any(1)[0]
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(changed, expected)
    assert_close(y[0, :, 4:8, 8:12], up.linear(z[0, :, 1, 2]).reshape(3, 4, 4))


# --- the models ------------------------------------------------------------------------------------------------

def tiny(kind):
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    common = dict(grid=(4, 4), patch=16)
    if kind == "e":
        return masked.MaskedFinolaE(encoder, masked.MaskedEConfig(channels=32, heads=4, **common))
    return masked.MaskedFinolaB(encoder, masked.MaskedBConfig(channels=240, width=32, depth=1, heads=2, **common))


@pytest.mark.parametrize("kind", ["e", "b"])
def test_nothing_of_the_masked_region_reaches_the_encoder(kind):
    model = tiny(kind).eval()
    seen = []
    model.encoder.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    x = torch.rand(2, 3, 64, 64)
    blocks = torch.tensor([[0, 2], [1, 1]])
    mask = masked.loss_mask(blocks, (4, 4), patch=16)
    y1, mask1 = model(x, blocks)
    y2, _ = model(torch.where(mask, torch.rand_like(x), x), blocks)  # every masked pixel changed
    assert torch.equal(mask1, mask)
    assert torch.equal(seen[0], seen[1]), "the encoder's input is the same"
    assert seen[0].shape == (2, 3, 32, 32)
    assert torch.equal(y1, y2), "so is everything predicted from it"


def test_masked_e_anchors_q_at_the_block_centre():
    model = tiny("e").eval()
    x = torch.rand(3, 3, 64, 64)
    blocks = torch.tensor([[0, 0], [2, 2], [0, 2]])
    q = model.pool(model.encode_block(x, blocks))
    z = model.build_map(x, blocks)
    for b, (r, c) in enumerate(blocks.tolist()):
        assert_close(z[b, :, r + 1, c + 1], q[b])
    centred = model.pool(model.encode_block(x, masked.centred_blocks(3, (4, 4))))
    assert_close(model.maps(x), finola.expand(dict(model.finola), centred, size=(4, 4)),
                 msg="the centred block's q sits where vanilla FINOLA puts it, (gh/2, gw/2)")


@pytest.mark.parametrize("kind", ["e", "b"])
def test_models_predict_images_and_evaluate_on_the_centred_block(kind):
    model = tiny(kind)
    x = torch.rand(2, 3, 64, 64)
    y, mask = model.train()(x)
    assert y.shape == x.shape and mask.shape == (2, 1, 64, 64) and mask.float().mean() == 0.75
    _, mask_eval = model.eval()(x)
    assert torch.equal(mask_eval, masked.loss_mask(masked.centred_blocks(2, (4, 4)), (4, 4), patch=16))
    assert model.maps(x).shape == (2, model.config.channels, 4, 4)
    with pytest.raises(ValueError, match=r"x: expected images \(B, 3, 64, 64\)"):
        model(torch.rand(2, 3, 32, 32))


# --- the tasks -------------------------------------------------------------------------------------------------

SMALL = ["--data", "photos", "--data-options", '{"crops_per_photo": 2, "with_wallpapers": false}', "--encoder", "mf-tiny", "--image-size", "64",
         "--grid", "4", "--batch-size", "4", "--log-every", "1", "--max-steps", "2", "--no-augment"]


TINY = {"masked-e": ["--channels", "32"], "masked-b": ["--upsampler-width", "32", "--upsampler-depth", "1"]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two-step runs of both tasks, shared by the tests below."""
    root = tmp_path_factory.mktemp("masked")
    for task, extra in TINY.items():
        train.main(["--task", task, *SMALL, "--out", str(root / task), *extra])
    return root


@pytest.mark.parametrize("task", sorted(TINY))
def test_masked_tasks_run_and_rebuild(pretrained, task, capsys):
    out = pretrained / task
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert set(rows[-1]["final"]) == {"masked_psnr_db", "block_colour_db", "images"}
    assert (out / "predictions.png").exists()
    model = weights.load_model(out / "model.safetensors")
    assert model.metadata["model"]["arch"] == task
    encoder = weights.load_encoder(out / "model.safetensors")
    assert all(p.requires_grad for p in encoder.parameters())
    capsys.readouterr()
    result = ev.main(["masked", "--weights", str(out / "model.safetensors")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result == rows[-1]["final"] | {"figure": str(out / "predictions.png")} and (out / "predictions.png").exists()


def test_app_d_reconstruction_keeps_the_pretrained_encoder_frozen(pretrained, tmp_path):
    pre = pretrained / "masked-b"
    out = tmp_path / "appd"
    train.main(["--task", "finola", *SMALL, "--pca-images", "0", "--spectral-loss", "0", "--optimizer", "adamw", "--channels", "16", "--widths", "16", "16", "16", "16", "16",
                "--init", str(pre / "model.safetensors"), "--freeze-encoder", "--out", str(out)])
    before, after = load_file(pre / "model.safetensors"), load_file(out / "model.safetensors")
    encoder = [k for k in after if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder)
    for k in encoder:  # weights and BatchNorm statistics: exactly the pre-trained encoder's
        assert torch.equal(after[k], before[k]), k
    assert weights.load_model(out / "model.safetensors").metadata["model"]["arch"] == "finola"
