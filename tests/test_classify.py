"""Classification decoders (classify.py), the frozen-encoder guarantee, the four classification tasks of train.py and
eval.py classify on a hand-made set with a known answer."""
import json

import pytest
import torch
from safetensors.torch import load_file

import classify
import eval as ev
import mobileformer
import train
import weights

CLASSES = 5  # the classes of conftest's `folder`


def classifier(decoder="lin", frozen=False, name="mf-tiny"):
    torch.manual_seed(0)
    encoder = mobileformer.create(name)
    config = classify.ClassifierConfig(num_classes=CLASSES, decoder=decoder, frozen=frozen)
    return classify.Classifier(encoder, config)


# --- decoders --------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """A tiny model gains nothing from a second thread, and beside another busy process its spin-waits slow it
    down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lin_is_batchnorm_without_affine_then_linear_on_the_pooled_map(one_thread):
    """After training-mode batches, eval normalizes the pooled map with the running statistics, not the batch's."""
    model = classifier("lin")
    assert isinstance(model.norm, torch.nn.BatchNorm1d) and not model.norm.affine
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(5):  # the BatchNorm learns running statistics of real pooled features
            model(torch.rand(4, 3, 32, 32, generator=g))
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        pooled = model.features(x).mean((2, 3))
        mean, var = model.norm.running_mean, model.norm.running_var
        expected = model.classifier((pooled - mean) / torch.sqrt(var + 1e-6))
        without_norm = model.classifier(pooled)
        batch_stats = model.classifier((pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-6))
        out = model(x)
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(var, torch.ones_like(var)), \
        "the training batches went through the BatchNorm and moved its running statistics"
    # so dropping the norm, or normalizing with the batch's statistics, would give other logits
    assert not torch.allclose(expected, without_norm, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(expected, batch_stats, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("head,blocks,width", [("tran-1", 1, 64), ("tran-4", 4, 64)])
def test_transformer_decoders_have_their_depth_and_width(head, blocks, width):
    model = classifier(head)
    assert len(model.blocks) == blocks and model.config.width == width and model.config.dropout == 0.1
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, CLASSES)


@pytest.mark.parametrize("name,head,paper", [("mf-w720", "tran-4", 7), ("mf-w1440", "tran-4", 20),
                                             ("mf-w2880", "tran-4", 57), ("mf-w720", "lin", 6),
                                             ("mf-w2880", "lin", 28)])
def test_parameter_counts_match_tables_6_and_7(name, head, paper):
    """Table 7 (tran-4) and Table 6 (lin), 1000 classes, within rounding (ours: 7.07 / 19.84 / 56.44 M and 5.68 /
    27.99 M). Table 6's W1440 + lin (14 M) is left out: backbone + linear is 13.2 M."""
    encoder = mobileformer.create(name)
    config = classify.ClassifierConfig(num_classes=1000, decoder=head)
    n = sum(p.numel() for p in classify.Classifier(encoder, config).parameters())
    assert n / 1e6 == pytest.approx(paper, abs=0.6)


def test_feature_norm_standardizes_the_maps_channels_before_tran_1s_embedding(one_thread):
    """--feature-norm: BatchNorm without affine over the map's channels (batch and positions), then tran-1 as
    before; a random mf-tiny's tokens are otherwise almost the same for every image (EXPERIMENTS.md)."""
    torch.manual_seed(0)
    config = classify.ClassifierConfig(num_classes=CLASSES, decoder="tran-1", frozen=True, feature_norm=True)
    model = classify.Classifier(mobileformer.create("mf-tiny"), config).train()
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.dropout.p = 0.0
    for block in model.blocks:
        block.dropout = 0.0
        block.mlp[2].p = block.mlp[4].p = 0.0
    with torch.no_grad():
        fmap = model.features(x)
        standard = (fmap - fmap.mean((0, 2, 3), keepdim=True)) / torch.sqrt(fmap.var((0, 2, 3), unbiased=False,
                                                                                     keepdim=True) + 1e-6)
        tokens = model.blocks(model.embed(standard.flatten(2).transpose(1, 2)))
        expected = model.classifier(model.norm(tokens).mean(1))
        torch.testing.assert_close(model(x), expected)
    assert not model.feature_norm.affine and not any(p.requires_grad is False for p in model.embed.parameters())
    plain = classify.Classifier(mobileformer.create("mf-tiny"), classify.ClassifierConfig(
        num_classes=CLASSES, decoder="tran-1"))
    assert isinstance(plain.feature_norm, torch.nn.Identity) and not plain.config.feature_norm   # the paper's


def test_bad_configs_name_the_argument():
    with pytest.raises(ValueError, match="decoder: expected one of"):
        classify.ClassifierConfig(decoder="tran-2")
    with pytest.raises(ValueError, match="width / dropout: no default for encoder 'mf-w4320'"):
        classify.Classifier(mobileformer.create("mf-w4320"), classify.ClassifierConfig(decoder="tran-1"))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_classification_loss_uses_this_runs_label_smoothing(smoothing):
    """--label-smoothing reaches the loss (Table 13: 0.1 for tran-1): against the textbook formula by hand."""
    torch.manual_seed(0)
    logits = torch.randn(4, CLASSES)
    labels = torch.tensor([0, 3, 1, 4])
    args = train.parse_args(["--task", "tran1-probe", "--data", "x", "--label-smoothing", str(smoothing)])
    loss = train.TASKS["tran1-probe"].loss(lambda images: logits, {"images": None, "labels": labels}, args)
    logp = logits.log_softmax(1)
    target = torch.full_like(logp, smoothing / CLASSES).scatter_add(
        1, labels[:, None], torch.full((4, 1), 1 - smoothing))
    torch.testing.assert_close(loss, -(target * logp).sum(1).mean())


# --- frozen means frozen ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["lin", "tran-1"])
def test_a_frozen_encoder_gets_no_gradient_and_keeps_its_batchnorm_statistics(head):
    model = classifier(head, frozen=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    for _ in range(3):
        model.train()
        assert model.training and not any(m.training for m in model.encoder.modules())
        loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in model.encoder.parameters())
    after = model.encoder.state_dict()
    assert any("running_mean" in k for k in after)
    for k, v in before.items():  # weights, running statistics and num_batches_tracked
        assert torch.equal(after[k], v), k
    decoder_after = {k: v for k, v in model.state_dict().items() if k in decoder_before}
    assert any(not torch.equal(v, decoder_before[k]) for k, v in decoder_after.items()), "the decoder trains"


# --- the tasks -------------------------------------------------------------------------------------------------

def common(folder):
    return ["--data", str(folder), "--encoder", "mf-tiny", "--image-size", "32", "--batch-size", "5",
            "--max-steps", "2", "--log-every", "1", "--crop-ratio", "1", "--no-augment"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    encoder = mobileformer.create("mf-tiny")
    return weights.save(tmp_path_factory.mktemp("enc") / "enc.safetensors", encoder.state_dict(),
                        arch="mobileformer", config=encoder.config_dict())


@pytest.fixture(scope="module")
def probe(folder, encoder_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "probe"
    train.main(["--task", "tran1-probe", *common(folder), "--init", str(encoder_file), "--out", str(out)])
    return out


def encoder_of(path):
    return {k[len("encoder."):]: v for k, v in load_file(path).items() if k.startswith("encoder.")}


def test_probes_keep_the_initial_encoder_exactly(folder, encoder_file, probe, tmp_path):
    out = tmp_path / "lin"
    train.main(["--task", "linprobe", *common(folder), "--init", str(encoder_file), "--out", str(out)])
    start = load_file(encoder_file)
    for run in (out, probe):
        saved = encoder_of(run / "model.safetensors")
        assert saved.keys() == start.keys()
        for k, v in start.items():
            assert torch.equal(saved[k], v), (run.name, k)
        final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["final"]
        assert set(final) == {"top1", "top5", "images"} and final["images"] == 9
    assert json.loads((out / "args.json").read_text())["optimizer"] == "sgd", "Table 13: SGD for linear probing"


def test_finetune_starts_from_the_probe_and_trains_the_encoder(folder, probe, tmp_path):
    argv = ["--task", "finetune", *common(folder), "--init", str(probe / "model.safetensors"), "--lr", "0.05"]
    model = train.TASKS["finetune"].build(train.parse_args(argv))
    probed = load_file(probe / "model.safetensors")
    for k, v in model.state_dict().items():  # encoder and decoder: the probe's
        assert torch.equal(v, probed[k]), k
    assert all(p.requires_grad for p in model.parameters()) and not model.config_dict()["frozen"]
    train.main(argv + ["--out", str(tmp_path / "ft")])
    tuned = encoder_of(tmp_path / "ft" / "model.safetensors")
    assert any(not torch.equal(v, probed["encoder." + k]) for k, v in tuned.items() if k.endswith("weight"))


def test_supervised_trains_from_scratch_and_refuses_init(folder, encoder_file, tmp_path):
    train.main(["--task", "supervised", *common(folder), "--out", str(tmp_path / "sup")])
    model = weights.load_model(tmp_path / "sup" / "model.safetensors")
    assert model.config.decoder == "tran-1" and not model.config.frozen
    with pytest.raises(ValueError, match="--init: the supervised baseline trains its encoder from scratch"):
        train.main(["--task", "supervised", *common(folder), "--init", str(encoder_file)])


# --- eval.py classify ------------------------------------------------------------------------------------------

def test_eval_classify_on_a_hand_made_set_with_a_known_answer(folder, encoder_file, tmp_path, capsys):
    """A 7-way classifier whose logits ignore the image and rank the classes 3 > 1 > 5 > 6 > 4 > 0 > 2: every image
    is called 3, and its top-5 is {3, 1, 5, 6, 4}. The 9 validation labels are 0, 1, 1, 2, 3, 3, 3, 4, 4: top-1 =
    3/9, top-5 = 7/9."""
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    model = classify.Classifier(encoder, classify.ClassifierConfig(
        num_classes=7, decoder="lin"))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([1.0, 5.0, 0.0, 6.0, 2.0, 4.0, 3.0]))
    path = weights.save_model(tmp_path / "c.safetensors", model, task="linprobe",
                              train={"image_size": 32, "crop_ratio": 1.0}, data=str(folder))
    capsys.readouterr()
    result = ev.main(["classify", "--weights", str(path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result == {"top1": round(3 / 9, 4), "top5": round(7 / 9, 4), "images": 9}
    with pytest.raises(ValueError, match="classify needs a 'classifier' model"):
        ev.main(["classify", "--weights", str(encoder_file)])
