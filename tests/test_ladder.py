"""ladder.py's rungs without FINOLA: the ``pca`` decoder is the PCA's own reconstruction, ``q-linear`` trains end to
end, and the command line refuses a ``pca`` rung that would predict normalized pixels; ``--pool-positions`` fits the
pooler's key positions to each encoder's map; ``--spectral-loss`` trains on the weighted loss."""
import argparse

import pytest
import torch
from torch.testing import assert_close

import analysis
import ladder

ARGS = argparse.Namespace(image_size=32, channels=8, grid=4, widths=[16, 8], encoder="mf-nano", final_act=False,
                          pool_positions=False, spectral_loss=0.0, optimizer="adamw")


def test_the_pca_decoder_of_the_pca_code_is_the_pca_reconstruction():
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(40, 3, 4, 4, generator=g) for _ in range(2)]
    pca = analysis.fit_pca(train, 6)
    x = torch.rand(5, 3, 4, 4, generator=g)
    code = ((x.flatten(1).double() - pca["mean"]) @ pca["basis"]).float()
    decoded = ladder.PCADecoder(pca)(code).view_as(x)
    assert_close(decoded, analysis.pca_reconstruct_images(x, pca), atol=1e-5, rtol=0)
    assert not list(ladder.PCADecoder(pca).parameters()), "the PCA decoder is fixed"


@pytest.mark.parametrize("rung", ["mf0/q-linear/normalized", "mf0/pca/pixels", "linear/pca/pixels"])
def test_rungs_without_finola_reconstruct_and_train_their_encoder(rung):
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3 * 32 * 32, ARGS.channels, dtype=torch.float64)).Q  # a PCA's form, cheaply
    pca = {"mean": torch.full((3 * 32 * 32,), 0.5, dtype=torch.float64), "basis": basis}
    model = ladder.build(rung, ARGS, pca)
    x = torch.rand(4, 3, 32, 32)
    y = model(x)
    assert y.shape == x.shape and not any(isinstance(m, torch.nn.ParameterDict) for m in model.modules())
    torch.nn.functional.mse_loss(y, x).backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "the loss reaches the encoder"


def test_a_pca_rung_must_predict_pixels(capsys):
    with pytest.raises(SystemExit):
        ladder.main(["--rungs", "mf0/pca/normalized"])
    assert "(pixels for pca)" in capsys.readouterr().err


@pytest.mark.parametrize("encoder, positions", [("mf0", (2, 2)), ("linear", (1, 1))])
def test_pool_positions_fit_each_encoder_s_map(encoder, positions):
    """mf-nano ends on a 2x2 map of 32² images, the linear encoder on a 1x1 one; the pooler's key positions follow."""
    torch.manual_seed(0)
    args = argparse.Namespace(**{**vars(ARGS), "pool_positions": True})
    model = ladder.build(f"{encoder}/linear/normalized", args)
    assert model.config.pool_positions == positions
    assert model.pool.key_pos.shape == (1, positions[0] * positions[1], model.encoder.out_channels)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_spectral_loss_trains_a_rung_on_the_weighted_mse(monkeypatch):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3 * 32 * 32, ARGS.channels, dtype=torch.float64, generator=g)).Q
    pca = {"mean": torch.full((3 * 32 * 32,), 0.5, dtype=torch.float64), "basis": basis,
           "variances": torch.logspace(1, -2, ARGS.channels, dtype=torch.float64)}
    alphas = []
    real = ladder.autoencoder.SpectralMSE.forward
    monkeypatch.setattr(ladder.autoencoder.SpectralMSE, "forward",
                        lambda self, y, x: alphas.append(self.alpha) or real(self, y, x))
    args = argparse.Namespace(**{**vars(ARGS), "spectral_loss": 0.25, "seed": 0, "lr": 1e-3, "warmup": 1,
                                 "batch_size": 4, "minutes": 0.002})
    x = torch.randint(0, 256, (520, 3, 32, 32), dtype=torch.uint8, generator=g)
    result = ladder.train_rung("mf0/linear/normalized", x, x[:4].float().div(255), args, pca)
    assert result["steps"] >= 1 and alphas == [0.25] * result["steps"]


def test_optimizer_muon_steps_a_rung_with_muon(monkeypatch):
    steps = []
    real = ladder.muon.Muon.step
    monkeypatch.setattr(ladder.muon.Muon, "step", lambda self: steps.append(1) or real(self))
    args = argparse.Namespace(**{**vars(ARGS), "optimizer": "muon", "seed": 0, "lr": 1e-3, "warmup": 1,
                                 "batch_size": 4, "minutes": 0.002})
    x = torch.randint(0, 256, (520, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = ladder.train_rung("mf0/linear/normalized", x, x[:4].float().div(255), args)
    assert result["steps"] >= 1 and len(steps) == result["steps"]
