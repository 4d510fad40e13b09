"""The paper's analyses (analysis.py), FINOLA as a codec (codec.py) and their eval.py commands on a tiny model."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.testing import assert_close

import analysis
import autoencoder
import codec
import eval as ev
import metrics
import finola
import mobileformer
import readout
import weights

# --- Eq. 9: Gaussian curvature against closed forms ------------------------------------------------------------------

N = 11
Y, X = torch.meshgrid(torch.arange(N, dtype=torch.float64) - N // 2, torch.arange(N, dtype=torch.float64) - N // 2,
                      indexing="ij")  # x is the column, y the row
R = 30.0
SURFACES = {  # name: (z(x, y), closed-form K(x, y), relative tolerance)
    "paraboloid": (0.3 * X ** 2 + 0.1 * Y ** 2, 4 * 0.3 * 0.1 / (1 + (0.6 * X) ** 2 + (0.2 * Y) ** 2) ** 2, 1e-12),
    "saddle": (0.2 * X * Y, -0.04 / (1 + 0.04 * (X ** 2 + Y ** 2)) ** 2, 1e-12),
    "plane": (0.5 * X - 0.25 * Y + 3, torch.zeros_like(X), 0),
    "cylinder": ((R ** 2 - X ** 2).sqrt(), torch.zeros_like(X), 0),
    "sphere": ((R ** 2 - X ** 2 - Y ** 2).sqrt(), torch.full_like(X, 1 / R ** 2), 3e-3),  # central differences: O(1/R^2)
}


@pytest.mark.parametrize("name", SURFACES)
def test_gaussian_curvature_matches_closed_forms_inside(name):
    z, k, rtol = SURFACES[name]
    assert_close(analysis.gaussian_curvature(z)[1:-1, 1:-1], k[1:-1, 1:-1], rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("name", ["paraboloid", "saddle", "plane"])
def test_border_is_exact_for_quadratics(name):
    """The documented border rule (quadratic extension) makes K exact on the whole grid for degree <= 2."""
    z, k, _ = SURFACES[name]
    assert_close(analysis.gaussian_curvature(z), k, rtol=1e-12, atol=1e-14)


def test_gaussian_curvature_keeps_leading_dims_and_refuses_tiny_grids():
    z = torch.stack([SURFACES["paraboloid"][0], SURFACES["saddle"][0]]).expand(3, 2, N, N)
    k = analysis.gaussian_curvature(z)
    assert k.shape == z.shape
    assert_close(k[2, 1], analysis.gaussian_curvature(SURFACES["saddle"][0]))
    with pytest.raises(ValueError, match="H, W >= 3"):
        analysis.gaussian_curvature(torch.zeros(4, 2, 5))


def test_rank_channels_orders_by_rms_of_peak_curvatures():
    z = torch.stack([0.05 * (X ** 2 + Y ** 2), 0.3 * X * Y, 0.5 * X + Y, 0.2 * (X ** 2 + Y ** 2)])[None]
    ranked = analysis.rank_channels(z, top=4)
    assert ranked["channel"].tolist() == [[3, 1, 0, 2]]  # peaks 4*0.2^2=0.16 (K>0), 0.3^2=0.09 (K<0), 0.01, 0
    assert_close(ranked["kappa_plus"][0, :2], torch.tensor([0.16, 0.0], dtype=torch.float64))
    assert_close(ranked["kappa_minus"][0, :2], torch.tensor([0.0, -0.09], dtype=torch.float64))
    assert_close(ranked["score"], ((ranked["kappa_plus"] ** 2 + ranked["kappa_minus"] ** 2) / 2).sqrt())
    assert analysis.rank_channels(z, top=2)["channel"].tolist() == [[3, 1]]


# --- Eq. 2, Eq. 4 -----------------------------------------------------------------------------------------------------

def _map(params, origin=(0, 0), size=(6, 7)):
    q = torch.randn(3, params["A"].shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return finola.expand(params, q, size=size, origin=origin)


def test_eq4_holds_where_the_map_is_one_solution_and_not_otherwise():
    gen = torch.Generator().manual_seed(0)
    p = finola.init(8, generator=gen, dtype=torch.float64, std=0.3)
    same = {"A": p["A"], "B": p["A"], "A_neg": p["A_neg"], "B_neg": p["A_neg"]}  # A = B: z(x, y) depends on x + y
    sums = analysis.pde_sums(same, _map(same))
    assert analysis.relative(sums, "r4", "zxx", "m2zyy") < 1e-10
    assert analysis.relative(sums, "rc", "bzx", "azy") < 1e-10
    sums = analysis.pde_sums(p, _map(p, origin=(2, 3)))
    assert analysis.relative(sums, "r4", "zxx", "m2zyy") > 1e-2
    assert analysis.relative(sums, "rc", "bzx", "azy") > 1e-2
    exact = torch.zeros(6, 6, dtype=torch.bool)
    exact[2, 3:] = True  # right of q on q's row, Eq. 1 holds exactly
    assert analysis.relative(sums, "rx", "dx", "ax", exact) < 1e-12
    assert analysis.relative(sums, "rx", "dx", "ax", ~exact) > 1e-3


@pytest.mark.parametrize("A, B, facts", [
    (torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.eye(3),
     {"cond_A": 3.0, "cond_B": 1.0, "B_invertible": True, "M_real_eigenvalues": 1.0, "M_imaginary_eigenvalues": 0.0}),
    (torch.tensor([[0.0, -1.0], [1.0, 0.0]]), torch.eye(2),  # a rotation: eigenvalues +-i, Eq. 4 is Laplace's
     {"M_real_eigenvalues": 0.0, "M_imaginary_eigenvalues": 1.0}),
    (torch.eye(2), torch.diag(torch.tensor([1.0, 1e-9])), {"cond_B": 1e9, "B_invertible": False}),
])
def test_matrix_facts(A, B, facts):
    got = analysis.matrix_facts({"A": A, "B": B})
    for k, v in facts.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k


# --- App. E.2: embedding space ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c", [(10, 6), (5, 8)])
def test_pca_with_every_component_is_exact_and_drops_the_tail_variance(n, c):
    q = torch.randn(n, c, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * torch.arange(1, c + 1)
    mean, components, variances = analysis.pca(q)
    assert len(components) == min(n, c) and bool((variances[:-1] >= variances[1:]).all())
    assert_close(analysis.pca_reconstruct(q, mean, components, len(components)), q)
    for k in range(1, len(components)):
        err = (q - analysis.pca_reconstruct(q, mean, components, k)).square().sum()
        assert_close(err, (n - 1) * variances[k:].sum())


def test_gaussian_samples_have_the_embeddings_mean_and_covariance():
    q = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.randn(
        4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = analysis.gaussian_samples(q, 200_000, generator=torch.Generator().manual_seed(2))
    assert_close(s.mean(0), q.mean(0), atol=0.02, rtol=0)
    assert_close(s.T.cov(), q.T.cov(), atol=0.05, rtol=0.03)
    few = q[:3]  # N <= C: the covariance is singular; samples stay in the embeddings' affine span
    s = analysis.gaussian_samples(few, 100, generator=torch.Generator().manual_seed(3)) - few.mean(0)
    _, _, basis = torch.linalg.svd(few - few.mean(0), full_matrices=False)
    assert_close(s @ basis[:2].T @ basis[:2], s)


def test_image_statistics():
    gray, red = torch.full((1, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert analysis.saturation(gray).item() == 0 and analysis.saturation(red).item() == 1
    assert analysis.contrast(gray).item() == 0 and analysis.total_variation(gray).item() == 0
    a = torch.rand(2, 3, 4, 4)
    assert_close(analysis.correlation(a, 1 - a), torch.tensor([-1.0, -1.0]))


# --- codec ------------------------------------------------------------------------------------------------------------

def test_8bit_quantisation_is_within_half_a_step():
    q = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.01], [1], [10], [100], [3]])
    codes, offset, scale = codec.quantize8(q)
    assert codes.dtype == torch.uint8 and offset.dtype == scale.dtype == torch.float16 and offset.shape == (5, 1)
    err = (codec.dequantize8(codes, offset, scale) - q).abs()
    assert bool((err <= scale.float() / 2 * (1 + 1e-5)).all())
    assert codes.min() == 0 and codes.max() >= 254
    flat = torch.full((1, 8), 0.75)
    assert_close(codec.dequantize8(*codec.quantize8(flat)), flat)


def test_jpeg_sweep_sizes_and_quality():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    sweep = codec.jpeg_sweep(x, [5, 50, 95])
    assert bool((sweep["scan_bytes"] < sweep["file_bytes"]).all()) and bool((sweep["scan_bytes"] > 0).all())
    assert sweep["file_bytes"][0] < sweep["file_bytes"][2] and sweep["psnr_db"][0] < sweep["psnr_db"][2]
    with pytest.raises(ValueError, match="start-of-scan"):
        codec.scan_bytes(b"\xff\xd8\xff\xd9")


# --- the commands on a tiny checkpoint --------------------------------------------------------------------------------

def _tiny(folder, seed):
    torch.manual_seed(seed)
    encoder = mobileformer.create("mf-tiny")
    config = autoencoder.FinolaConfig(channels=16, grid=(4, 4), widths=(8, 8, 8, 8))
    model = autoencoder.Finola(encoder, config)
    return weights.save_model(folder / "model.safetensors", model, task="finola", data="photos",
                              train={"data_options": {"crops_per_photo": 2}})  # 4 validation images of 32 px


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return _tiny(root / "a", 0), _tiny(root / "b", 1)


def run(capsys, *argv):
    capsys.readouterr()
    result = ev.main([str(a) for a in argv])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    return last


def test_curvature_command_overlays_checkpoints(tiny, tmp_path, capsys):
    out = run(capsys, "curvature", "--weights", *tiny, "--top", "5", "--out", tmp_path)
    assert set(out["checkpoints"]) == {"a", "b"}
    for summary in out["checkpoints"].values():
        assert summary["images"] == 4 and summary["top"] == 5
        assert summary["score_top1_median"] >= summary["score_topk_median"] >= 0
        assert summary["kappa_plus_topk_median"] >= 0 >= summary["kappa_minus_topk_median"]
    assert Image.open(out["figure"]).size[0] > 100
    with pytest.raises(ValueError, match="--labels: expected 2 distinct labels"):
        ev.main(["curvature", "--weights", *map(str, tiny), "--labels", "x", "--out", str(tmp_path)])


def test_embedding_command(tiny, tmp_path, capsys):
    out = run(capsys, "embedding", "--weights", tiny[0], "--out", tmp_path)
    assert out["images"] == 4 and out["channels"] == 16 and out["pca_k"] == [1, 4]
    assert out["pca_psnr_db"][-1] == pytest.approx(out["reconstruction_psnr_db"], abs=1e-3), "all components: exact"
    assert 0 <= out["mean_q_saturation"] <= 1 and -1 <= out["mirror_correlation"] <= 1
    assert out["pca_explained"][-1] == pytest.approx(1.0)
    for f in out["figures"]:
        assert Image.open(f).size[0] > 100


def test_pde_command(tiny, tmp_path, capsys):
    out = run(capsys, "pde", "--weights", tiny[0], "--out", tmp_path)
    assert out["eq2_exact_part_relative"] < 1e-5 < out["eq2_x_relative"]
    assert out["B_invertible"] and out["cond_B"] >= 1 and 0 <= out["eq4_relative"] <= 1
    assert Image.open(out["figure"]).size[0] > 100
    wave = [out[f"wave_{q}_relative"] for q in ("right-down", "left-down", "right-up", "left-up")]
    assert any(w is not None for w in wave) and all(w is None or 0 <= w <= 1 for w in wave)  # a 4x4 map: 1 quadrant
    speeds = json.loads(Path(out["speeds_file"]).read_text())
    assert len(speeds["right-down"]) == 16 and out["speeds_abs_max"] > 0, "C = 16 speeds, each [real, imaginary]"


def test_ridge_streamed_equals_the_closed_form_in_one_batch():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(300, 7, generator=g) * 3 + 1, torch.randn(300, 5, generator=g)
    ridge = readout.Ridge(0.1)
    for part in range(0, 300, 64):
        ridge.add(f[part:part + 64], y[part:part + 64])
    w, mf, my = ridge.fit()
    fc, yc = (f - f.mean(0)).double(), (y - y.mean(0)).double()
    gram = fc.T @ fc
    expected = torch.linalg.solve(gram + 0.1 * gram.diagonal().mean() * torch.eye(7, dtype=torch.float64), fc.T @ yc)
    assert_close(w, expected)
    exact = readout.Ridge(1e-12)
    exact.add(f, f @ torch.arange(14.0).reshape(7, 2) - 4)  # targets linear in the features: read back exactly
    assert_close(exact.predict(f[:9]), f[:9] @ torch.arange(14.0).reshape(7, 2) - 4, atol=1e-4, rtol=0)


def test_stage_features_follow_the_model(tiny):
    model = weights.load_model(tiny[0]).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        stages = readout.stage_features(model, x)
        fmap, _ = model.encoder(model.pixels(x, size=model.image_size))
        assert_close(stages["q"], model.encode(x))
        assert_close(stages["FINOLA map"], model.maps(x))
    assert list(stages)[:2] == ["stem", "block 0"] and list(stages)[-3:] == ["encoder map", "q", "FINOLA map"]
    assert len(stages) == 1 + len(model.encoder.blocks) + 3 and stages["encoder map"].shape == fmap.shape
    assert stages["stem"].shape == (3, model.encoder.config.stem_channels, 16, 16)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (4, 2), (8, 8)])
def test_blocks_are_the_grid_cells_and_unblocks_inverts_them(grid):
    x = torch.rand(2, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    b = readout.blocks(x, grid)
    bh, bw = 16 // grid[0], 8 // grid[1]
    slow = torch.stack([x[n, :, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].flatten()
                        for n in range(2) for i in range(grid[0]) for j in range(grid[1])])
    assert_close(b, slow)
    assert_close(readout.unblocks(b, grid, x.shape), x)


def test_layout_pca_of_one_cell_is_the_pca_and_a_wide_layout_is_lossless():
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(64, 3, 8, 8, generator=g) for _ in range(3)]
    x_val = torch.rand(20, 3, 8, 8, generator=g)
    pca = analysis.fit_pca(train, 10)
    whole = analysis.psnr(x_val, analysis.pca_reconstruct_images(x_val, pca)).mean().item()
    assert readout.layout_pca(train, x_val, 10, (1, 1)) == pytest.approx(whole, abs=1e-3)
    assert readout.layout_pca(train, x_val, 12, (4, 4)) == math.inf, "a 2x2 block holds 12 numbers: nothing to lose"
    assert readout.layout_pca(train, x_val, 4, (3, 3)) is None, "3 does not tile 8"
    assert readout.layout_pca(train, x_val, 4, (4, 4)) < readout.layout_pca(train, x_val, 8, (4, 4))


@pytest.mark.slow  # ~12 s: the read-out decodes the photos for its training crops
def test_readout_command(tiny, tmp_path, capsys):
    out = run(capsys, "readout", "--weights", tiny[0], "--train-images", "200")
    assert out["train_images"] == 200 and out["pca_k"] == 16 and out["images"] > 0
    stages = {row["stage"]: row for row in out["stages"]}
    assert stages["q"]["numbers"] == 16 and stages["FINOLA map"]["numbers"] == 16 * 4 * 4
    assert all(10 < row["psnr_db"] < 60 for row in out["stages"])
    assert stages["stem"]["psnr_db"] > stages["q"]["psnr_db"], "the stem's 2,048 numbers hold more than q's 16"
    assert stages["q"]["layout_pca_db"] is None and not stages["q"]["layout_lossless"]
    assert all((row["layout_pca_db"] is None) == (row["stage"] == "q" or row["layout_lossless"]) for row in out["stages"])
    assert all(row["layout_pca_db"] is None or 10 < row["layout_pca_db"] < 80 for row in out["stages"])


def test_codec_round_trip_and_refusal(tiny, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(48, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        image)
    enc = run(capsys, "encode", image, "--weights", tiny[0], "-o", tmp_path / "photo.q")
    assert enc["payload_bytes"] == 32 and enc["file_bytes"] > 32
    model = weights.load_model(tiny[0])
    x = metrics.whole(model, {})(Image.open(image).convert("RGB"))[None]
    stored = codec.load_q(tmp_path / "photo.q", identity=codec.model_identity(model))
    assert stored.dtype == torch.float16 and torch.equal(stored, codec.encode(model, x)[0])
    dec = run(capsys, "decode", tmp_path / "photo.q", "--weights", tiny[0], "-o", tmp_path / "back.png")
    back = torch.from_numpy(np.array(Image.open(dec["image"]))).permute(2, 0, 1).float() / 255
    assert_close(back, codec.decode(model, stored[None])[0], atol=0.5 / 255 + 1e-6, rtol=0)
    assert analysis.psnr(x, back[None]).item() == pytest.approx(enc["psnr_db"], abs=0.1)
    with pytest.raises(ValueError, match="encoded by a different model"):
        ev.main(["decode", str(tmp_path / "photo.q"), "--weights", str(tiny[1])])
    save_file({"q": torch.zeros(16)}, tmp_path / "other.q", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a FINOLA .q file"):
        codec.load_q(tmp_path / "other.q", identity="x")


def test_model_identity_sees_any_change(tiny):
    a, b = weights.load_model(tiny[0]), weights.load_model(tiny[0])
    assert codec.model_identity(a) == codec.model_identity(b)
    with torch.no_grad():
        b.finola["A"][3, 5] += 1e-6
    assert codec.model_identity(a) != codec.model_identity(b)


def test_rate_distortion_command(tiny, tmp_path, capsys):
    out = run(capsys, "rate-distortion", "--weights", tiny[0], "--out", tmp_path, "--max-images", "3")
    assert out["images"] == 3 and out["q_fp16_bytes"] == 32 and out["q8_bytes"] == 20
    assert out["q_file_bytes"] > out["q_fp16_bytes"], "the .q file adds its metadata"
    assert out["q_fp16_psnr_db"] == pytest.approx(out["q_fp32_psnr_db"], abs=0.05)
    assert out["jpeg_file_at_q8_quality"] <= out["jpeg_file_at_q_fp16_quality"], "fewer bytes, lower quality"
    assert len(out["curve_quality"]) == len(out["curve_psnr_db"]) == 95
    assert Image.open(out["figure"]).size[0] > 100


def test_commands_need_a_finola_model(tmp_path):
    m = mobileformer.create("mf-tiny")
    path = weights.save(tmp_path / "enc.safetensors", m.state_dict(), arch="mobileformer", config=m.config_dict(),
                        data="photos")
    for command in ("embedding", "pde", "curvature", "rate-distortion", "readout"):
        with pytest.raises(ValueError, match=f"'mobileformer' model; {command} needs a 'finola'"):
            ev.main([command, "--weights", str(path)])
