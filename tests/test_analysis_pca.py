"""The PCA baseline of reconstruction: analysis.fit_pca and pca_reconstruct_images against exact cases and a slow SVD
reference, metrics.pca_baseline's crops, and pca_db in metrics.reconstruct and ``eval.py reconstruct``."""
import json

import pytest
import torch
from torch.testing import assert_close

import analysis
import eval as ev
import autoencoder
import metrics
import mobileformer
import weights

D = 3 * 4 * 4  # the flattened size of the small images below


def spread(n: int, *, seed: int = 0) -> torch.Tensor:
    """n images (n, 3, 4, 4) in float64 with well-separated principal variances (0.9^2i along random directions)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    flat = 0.5 + 0.1 * (torch.randn(n, D, generator=g, dtype=torch.float64) * 0.9 ** torch.arange(D)) @ q.T
    return flat.reshape(n, 3, 4, 4)


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


# --- analysis.fit_pca and pca_reconstruct_images ---------------------------------------------------------------------

def test_images_in_a_k_dimensional_affine_subspace_are_exact_with_k_components_only():
    g = torch.Generator().manual_seed(1)
    k = 5
    mean, directions = torch.rand(D, generator=g, dtype=torch.float64), torch.randn(k, D, generator=g,
                                                                                    dtype=torch.float64)

    def draw(n):
        return (mean + 0.1 * torch.randn(n, k, generator=g, dtype=torch.float64) @ directions).reshape(n, 3, 4, 4)

    fitted, unseen = draw(40), draw(10)
    pca = analysis.fit_pca([fitted], k)
    assert pca["basis"].shape == (D, k) and pca["images"] == 40
    assert pca["explained"] == pytest.approx(1.0, abs=1e-12)
    for x in (fitted, unseen):  # the whole subspace, not just the fitted points
        assert_close(analysis.pca_reconstruct_images(x, pca), x, rtol=0, atol=1e-12)
    short = analysis.pca_reconstruct_images(unseen, analysis.fit_pca([fitted], k - 1))
    assert (short - unseen).abs().max() > 1e-2, "k - 1 components cannot hold a k-dimensional subspace"


@pytest.mark.parametrize("k", [1, 7, D - 1])
def test_fit_pca_agrees_with_the_svd_of_the_centred_data(k):
    x = spread(200)
    pca = analysis.fit_pca(x.split(32), k)
    flat = x.flatten(1)
    _, s, vh = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    assert_close(pca["mean"], flat.mean(0), rtol=0, atol=1e-14)
    assert_close(pca["basis"].T @ pca["basis"], torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    assert_close(projector(pca["basis"]), projector(vh[:k].T), rtol=0, atol=1e-10)
    assert_close(pca["variances"], s[:k].square() / (len(x) - 1), rtol=1e-10, atol=0)  # unbiased, decreasing
    assert pca["explained"] == pytest.approx((s[:k].square().sum() / s.square().sum()).item(), rel=1e-12)
    centred = flat - flat.mean(0)
    slow = flat.mean(0) + centred @ vh[:k].T @ vh[:k]
    assert_close(analysis.pca_reconstruct_images(x, pca), slow.reshape(x.shape), rtol=0, atol=1e-10)
    assert analysis.pca_reconstruct_images(x.float(), pca).dtype == torch.float32


def test_batching_does_not_change_the_fit():
    x = spread(120, seed=2)
    whole = analysis.fit_pca([x], 6)
    for batches in (list(x.split(7)), ({"images": b} for b in x.split(50)), [x[:0], *x.split(1)]):
        pca = analysis.fit_pca(batches, 6)
        assert pca["images"] == 120
        assert_close(pca["mean"], whole["mean"], rtol=0, atol=1e-14)
        assert_close(projector(pca["basis"]), projector(whole["basis"]), rtol=0, atol=1e-10)
        assert pca["explained"] == pytest.approx(whole["explained"], rel=1e-12)
    capped = analysis.fit_pca(x.split(7), 6, max_images=50)  # stops inside the 8th batch
    first = analysis.fit_pca([x[:50]], 6)
    assert capped["images"] == 50
    assert_close(projector(capped["basis"]), projector(first["basis"]), rtol=0, atol=1e-10)


def test_clear_errors():
    x = spread(10)
    with pytest.raises(ValueError, match="k: a PCA needs at least 1 component, got k=0"):
        analysis.fit_pca([x], 0)
    with pytest.raises(ValueError, match=f"k: {D + 1} components, but the images have only D = {D} numbers"):
        analysis.fit_pca([spread(D + 2)], D + 1)
    with pytest.raises(ValueError, match=r"images: a 10-component PCA needs at least k \+ 1 = 11 images, got 10"):
        analysis.fit_pca([x], 10)
    with pytest.raises(ValueError, match=r"needs at least k \+ 1 = 2 images, got 0"):
        analysis.fit_pca([], 1)
    with pytest.raises(ValueError, match=r"max_images: a 4-component PCA needs at least k \+ 1 = 5 images, got 4"):
        analysis.fit_pca([x], 4, max_images=4)
    with pytest.raises(ValueError, match="every image must have D = 48 numbers, got a batch with 27"):
        analysis.fit_pca([x, torch.rand(4, 3, 3, 3)], 2)
    with pytest.raises(analysis.PCATooLarge, match=r"D = 16428 numbers are too large for an exact PCA") as error:
        analysis.fit_pca([torch.zeros(2, 3, 74, 74)], 1)  # refused before the 2 GiB covariance is made
    assert isinstance(error.value, ValueError)
    with pytest.raises(ValueError, match="x: images of 27 numbers, but the PCA was fitted on images of 48"):
        analysis.pca_reconstruct_images(torch.rand(2, 3, 3, 3), analysis.fit_pca([x], 2))


# --- autoencoder.SpectralMSE: the pixel MSE weighted along the PCA's directions (--spectral-loss) -------------------

def slow_spectral_mse(y, x, pca, alpha):
    """Image by image over a complete orthonormal basis: the PCA's K directions weighted (λ_K / λ_k)^α, the rest 1."""
    basis = pca["basis"]
    rest, _, _ = torch.linalg.svd(torch.eye(D, dtype=torch.float64) - basis @ basis.T)
    full = torch.cat([basis, rest[:, : D - basis.shape[1]]], 1)          # (D, D), orthonormal
    w = torch.cat([(pca["variances"][-1] / pca["variances"]) ** alpha, torch.ones(D - basis.shape[1],
                                                                                 dtype=torch.float64)])
    total = 0.0
    for yi, xi in zip(y, x):
        e = (yi - xi).flatten().double()
        total += sum(w[d] * (full[:, d] @ e) ** 2 for d in range(D)) / D
    return total / len(y)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.9])
def test_spectral_mse_agrees_with_the_slow_weighted_sum(alpha):
    pca = analysis.fit_pca([spread(200)], 7)
    g = torch.Generator().manual_seed(1)
    y, x = torch.rand(3, 3, 4, 4, generator=g), torch.rand(3, 3, 4, 4, generator=g)
    loss = autoencoder.SpectralMSE(pca, alpha)(y, x)
    assert_close(loss.double(), slow_spectral_mse(y, x, pca, alpha), rtol=1e-5, atol=0)
    if alpha == 0:
        assert_close(loss, torch.nn.functional.mse_loss(y, x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_spectral_weights_keep_the_pca_as_the_best_linear_code(alpha):
    """The weighted objective's best K-dimensional code (the top-K eigenspace of the covariance seen through the
    loss's metric M) is the PCA's own: the weighting changes how hard each direction pulls, not the target."""
    x, k = spread(400), 7
    whole = analysis.fit_pca([x], D - 1)
    pca = {key: (value[:, :k] if key == "basis" else value[:k] if key == "variances" else value)
           for key, value in whole.items()}
    weights = (pca["variances"][-1] / pca["variances"]) ** alpha
    assert bool((weights <= 1).all()) and bool((weights[:-1] < weights[1:]).all())
    root = torch.eye(D, dtype=torch.float64) + pca["basis"] @ torch.diag(weights.sqrt() - 1) @ pca["basis"].T
    flat = x.flatten(1) - x.flatten(1).mean(0)
    seen = analysis.fit_pca([(flat @ root).reshape(x.shape)], k)   # M^½ x, M^½ symmetric
    assert_close(projector(seen["basis"]), projector(pca["basis"]), rtol=0, atol=1e-8)


def test_spectral_mse_clear_errors():
    pca = analysis.fit_pca([spread(40)], 3)
    with pytest.raises(ValueError, match=r"alpha: expected 0 <= alpha < 1 .* got 1.0"):
        autoencoder.SpectralMSE(pca, 1.0)
    with pytest.raises(ValueError, match="y, x: images of 27 numbers, but the spectrum was fitted on 48"):
        autoencoder.SpectralMSE(pca, 0.25)(torch.rand(2, 3, 3, 3), torch.rand(2, 3, 3, 3))


# --- eval.py: pca_baseline, reconstruct(pca=...), the reconstruct command --------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny FINOLA model (C = 16, 32 x 32 images: D = 3072) saved as trained on 2 crops per photo."""
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    config = autoencoder.FinolaConfig(channels=16, grid=(4, 4), widths=(8, 8, 8, 8))
    model = autoencoder.Finola(encoder, config).eval()
    # 14 training rows, 4 validation images
    path = weights.save_model(tmp_path_factory.mktemp("tiny") / "model.safetensors", model, task="finola",
                              data="photos", train={"data_options": {"crops_per_photo": 2, "with_wallpapers": False}})
    return model, path


def test_reconstruct_reports_pca_db_as_computed_by_hand(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    batches = [{"images": torch.rand(n, 3, 32, 32, generator=g)} for n in (3, 2)]
    basis, _ = torch.linalg.qr(torch.randn(3072, 16, generator=g, dtype=torch.float64))
    pca = {"mean": 0.25 + 0.5 * torch.rand(3072, generator=g, dtype=torch.float64), "basis": basis,
           "explained": 0.5, "images": 1234}
    plain, out = metrics.reconstruct(model, batches), metrics.reconstruct(model, batches, pca=pca)
    assert out == plain | {"pca_db": out["pca_db"], "pca_images": 1234, "pca_explained": 0.5}
    x = torch.cat([b["images"] for b in batches]).flatten(1).double()
    y = (pca["mean"] + (x - pca["mean"]) @ basis @ basis.T).clamp(0, 1)  # psnr clamps the reconstruction
    by_hand = (10 * torch.log10(1 / (x - y).square().mean(1))).mean().item()
    assert out["pca_db"] == pytest.approx(by_hand, abs=6e-4)  # reported to 3 decimals


def test_pca_baseline_draws_the_same_training_crops_every_time(tiny, monkeypatch):
    model, _ = tiny
    calls = []

    def keep(images, k, *, max_images):  # the crops instead of the fit
        calls.append((k, max_images))
        return torch.cat(list(images))

    monkeypatch.setattr(analysis, "fit_pca", keep)
    first = metrics.pca_baseline(model, "photos", {"crops_per_photo": 2, "with_wallpapers": False}, n=40, batch_size=8)
    again = metrics.pca_baseline(model, "photos", {"crops_per_photo": 2, "with_wallpapers": False}, n=40, batch_size=8)
    assert calls == [(16, 40), (16, 40)] and first.shape == (40, 3, 32, 32)
    assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first[:14].sort(0).values, first[14:28].sort(0).values), "each epoch draws new crops"


def run(capsys, *argv):
    capsys.readouterr()
    result = ev.main([str(a) for a in argv])
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    return last, captured.err


def test_reconstruct_command_fits_the_pca_on_the_weights_training_data(tiny, capsys, monkeypatch):
    _, path = tiny
    out, err = run(capsys, "reconstruct", "--weights", path, "--pca-images", 40)
    assert out["images"] == 4 and out["pca_images"] == 40 and 0 < out["pca_explained"] <= 1
    assert isinstance(out["pca_db"], float) and "PCA, k = 16" in err and "explain" in err

    out, _ = run(capsys, "reconstruct", "--weights", path, "--pca-images", 0)
    assert not any(k.startswith("pca") for k in out)

    seen, real = [], metrics.pca_baseline

    def spy(model, source, options, **kw):
        seen.append((source, options))
        return real(model, source, options, **kw)

    monkeypatch.setattr(metrics, "pca_baseline", spy)
    monkeypatch.setattr(analysis, "PCA_MAX_DIM", 3000)  # 32 x 32 images (D = 3072) now count as too large
    out, err = run(capsys, "reconstruct", "--weights", path, "--data", "photos", "--pca-images", 40)
    assert seen == [("photos", {"crops_per_photo": 2, "with_wallpapers": False, "streaming": False})], \
        "the training data, not --data's"
    assert out["images"] == 128 and out["pca_db"] is None and out["pca_images"] == 0
    assert "PCA baseline skipped" in err and "too large" in err
    with pytest.raises(ValueError, match="--pca-images: expected 0"):
        ev.main(["reconstruct", "--weights", str(path), "--pca-images", "-1"])
