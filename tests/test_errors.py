"""Bad input gets a one-line error naming the file or flag and what is wrong: junk and truncated
.q files, weights whose tensors or metadata are wrong, missing Fashion-MNIST, a non-image given to ``eval.py encode``.
The library raises a clear exception; the command lines print it as one line on stderr and exit with status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import autoencoder
import codec
import data
import embedded
import errors
import eval as ev
import mobileformer
import weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A FINOLA weights file (mf-tiny, C = 16, 4x4 grid, 32 px)."""
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    config = autoencoder.FinolaConfig(channels=16, grid=(4, 4), widths=(8, 8, 8, 8))
    model = autoencoder.Finola(encoder, config)
    return weights.save_model(tmp_path_factory.mktemp("tiny") / "model.safetensors", model, task="finola",
                              data="photos")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FINOLA_DEBUG", raising=False)


def one_line(capsys, main, *argv) -> str:
    """Run ``main`` as its command line does (``errors.run``): exit status 2 and exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        errors.run(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ": error: " in lines[0]
    return lines[0]


def single_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 600, message
    return message


# --- .q files ---------------------------------------------------------------------------------------------------------

def test_truncated_and_junk_q_files(tmp_path):
    good = codec.save_q(tmp_path / "good.q", torch.linspace(-1, 1, 16), identity="abc")
    assert torch.equal(codec.load_q(good, identity="abc"), torch.linspace(-1, 1, 16).half())  # the control
    raw = good.read_bytes()
    for cut in (0, 5, 8, 40, len(raw) - 32, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.q"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError) as e:
            codec.load_q(bad, identity="abc")
        assert f"cut{cut}.q" in single_line(e) and "is not a safetensors file, or is truncated" in str(e.value)
    for name, junk in (("text.q", b"hello, this is not a q file\n" * 3),
                       ("noise.q", np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())):
        (tmp_path / name).write_bytes(junk)
        with pytest.raises(ValueError) as e:
            codec.load_q(tmp_path / name, identity="abc")
        assert name in single_line(e) and "is not a safetensors file" in str(e.value)


def test_well_formed_q_files_with_damaged_contents(tmp_path):
    meta = {"format": codec.Q_FORMAT, "model": "abc", "weights": "", "channels": "16"}
    cases = {"float32.q": ({"q": torch.zeros(16)}, meta, "got torch.float32 (16,)"),
             "short.q": ({"q": torch.zeros(8).half()}, meta, "got torch.float16 (8,)"),
             "matrix.q": ({"q": torch.zeros(4, 4).half()}, meta, "got torch.float16 (4, 4)"),
             "nan.q": ({"q": torch.full((16,), float("nan")).half()}, meta, "with non-finite values"),
             "nochannels.q": ({"q": torch.zeros(16).half()}, {**meta, "channels": "x"}, "the 'x' channels")}
    for name, (tensors, metadata, detail) in cases.items():
        save_file(tensors, tmp_path / name, metadata=metadata)
        with pytest.raises(ValueError) as e:
            codec.load_q(tmp_path / name, identity="abc")
        assert name in single_line(e) and "is damaged" in str(e.value) and detail in str(e.value)
    save_file({"q": torch.zeros(16).half()}, tmp_path / "fine.q", metadata=meta)  # the control: the same, intact
    assert codec.load_q(tmp_path / "fine.q", identity="abc").shape == (16,)


def test_decode_command_on_junk_and_truncated_q_files(tiny, tmp_path, capsys):
    (tmp_path / "junk.q").write_bytes(b"\x00" * 100)
    line = one_line(capsys, ev.main, "decode", tmp_path / "junk.q", "--weights", tiny)
    assert "junk.q" in line and "is not a safetensors file, or is truncated" in line
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    ev.main(["encode", str(image), "--weights", str(tiny), "-o", str(tmp_path / "photo.q")])
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name], "written through a temporary name"
    raw = (tmp_path / "photo.q").read_bytes()
    (tmp_path / "cut.q").write_bytes(raw[: len(raw) // 2])
    line = one_line(capsys, ev.main, "decode", tmp_path / "cut.q", "--weights", tiny)
    assert "cut.q" in line and "truncated" in line
    with pytest.raises(ValueError, match="cut.q"):  # --debug: the exception itself, traceback and all
        errors.run(ev.main, ["decode", str(tmp_path / "cut.q"), "--weights", str(tiny), "--debug"])


# --- eval.py encode: a file that is not an image -------------------------------------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("notes.png", b"just some text, not pixels\n", "is not an image Pillow can read"),
    ("empty.jpg", b"", "is not an image Pillow can read"),
    ("half.png", None, "is not an image Pillow can read"),
    ("missing.png", "absent", "image: no such file"),
])
def test_encode_command_on_a_non_image(tiny, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is None:  # a PNG cut in half
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content != "absent":
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        codec.read_image(path)
    assert name in single_line(e) and expected in str(e.value)
    line = one_line(capsys, ev.main, "encode", path, "--weights", tiny)
    assert name in line and expected in line
    assert not list(tmp_path.glob("*.q")), "no .q file is written"


def test_eval_py_as_a_script_prints_one_line_and_exits_2(tiny, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FINOLA_DEBUG", None)
    done = subprocess.run([sys.executable, "eval.py", "encode", str(notes), "--weights", str(tiny)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: image: ") and "notes.jpg" in lines[0], done.stderr


# --- weights files -------------------------------------------------------------------------------------------------

def _mobileformer(tmp_path, name="mf.safetensors", **overrides) -> tuple[Path, dict]:
    model = mobileformer.create("mf-tiny", **overrides)
    path = weights.save(tmp_path / name, model.state_dict(), arch="mobileformer", config=model.config_dict(),
                        data="photos")
    return path, model.state_dict()


def _rewrite(path: Path, out: Path, *, tensors=None, **metadata) -> Path:
    """A copy of weights file ``path`` with other tensors and/or metadata values."""
    with safe_open(str(path), framework="pt") as f:
        meta, original = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(original if tensors is None else tensors, out, metadata={**meta, **metadata})
    return out


def test_tensors_that_do_not_match_the_metadata(tmp_path, capsys):
    path, sd = _mobileformer(tmp_path)
    assert weights.load_model(path).config.name == "mf-tiny"  # the control: the file as written loads
    sd, n = dict(sd), len(sd)
    dropped = sorted(sd)[0]
    del sd[dropped]
    reshaped = next(k for k in sorted(sd) if sd[k].dim() == 4)
    rows = sd[reshaped].shape[0] + 1
    sd[reshaped] = torch.zeros(rows, *sd[reshaped].shape[1:])
    sd["extra.weight"] = torch.zeros(3)
    bad = _rewrite(path, tmp_path / "bad.safetensors", tensors=sd)
    with pytest.raises(ValueError) as e:
        weights.load_model(bad)
    message = single_line(e)
    assert message.startswith(f"weights: {str(bad)!r}: tensors do not match the model its metadata describes")
    assert f"missing (1): {dropped}" in message and "unexpected (1): extra.weight" in message
    assert f"shape mismatch (1): {reshaped}: file ({rows}, " in message

    # a whole other model under the metadata of mf-tiny: many names, shortened to a few and a count
    other = mobileformer.create("mf-tiny", num_classes=10).state_dict()
    renamed = {f"module.{k}": v for k, v in other.items()}
    wrong = _rewrite(path, tmp_path / "wrong.safetensors", tensors=renamed)
    with pytest.raises(ValueError) as e:
        weights.load_model(wrong)
    message = single_line(e)
    assert f"missing ({n}): " in message and "more" in message and f"unexpected ({len(renamed)})" in message

    line = one_line(capsys, ev.main, "reconstruct", "--weights", bad)
    assert "bad.safetensors" in line and "tensors do not match" in line


def test_unknown_architecture_or_unbuildable_config(tmp_path, capsys):
    path, _ = _mobileformer(tmp_path)
    unknown = _rewrite(path, tmp_path / "resnet.safetensors", model=json.dumps({"arch": "resnet50", "config": {}}))
    with pytest.raises(ValueError) as e:
        weights.load_model(unknown)
    assert single_line(e) == (f"weights: {str(unknown)!r}: unknown architecture 'resnet50' in metadata 'model'; "
                              f"expected one of {sorted(weights.architectures())}")
    line = one_line(capsys, ev.main, "embedding", "--weights", unknown)
    assert "resnet.safetensors" in line and "unknown architecture 'resnet50'" in line

    no_config = _rewrite(path, tmp_path / "noconfig.safetensors", model=json.dumps({"arch": "mobileformer"}))
    with pytest.raises(ValueError, match="noconfig.safetensors.*has no 'config' object"):
        weights.load_model(no_config)
    for name, config in (("field", {"no_such_field": 1}), ("value", {"token_dim": 7, "former_heads": 2})):
        odd = _rewrite(path, tmp_path / f"{name}.safetensors",
                       model=json.dumps({"arch": "mobileformer", "config": config}))
        with pytest.raises(ValueError) as e:
            weights.load_model(odd)
        assert f"{name}.safetensors" in single_line(e) and "config in metadata 'model' does not build a model" in str(
            e.value)


@pytest.mark.parametrize("key", ["model", "train", "metrics"])
@pytest.mark.parametrize("value, expected", [("{not json", "is not valid JSON"),
                                             ("[1, 2]", "should be a JSON object, got list")])
def test_corrupt_json_in_metadata(tmp_path, capsys, key, value, expected):
    path, _ = _mobileformer(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.safetensors", **{key: value})
    with pytest.raises(ValueError) as e:
        weights.read_metadata(bad)
    message = single_line(e)
    assert message.startswith(f"weights: {str(bad)!r}: metadata {key!r} ") and expected in message
    line = one_line(capsys, ev.main, "classify", "--weights", bad)
    assert "bad.safetensors" in line and f"metadata {key!r}" in line


# --- data: missing Fashion-MNIST -----------------------------------------------------------------------------------

def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "FASHION_DIR", tmp_path)
    for split, first in (("train", "train-images-idx3-ubyte.gz"), ("test", "t10k-images-idx3-ubyte.gz")):
        with pytest.raises(FileNotFoundError) as e:
            data.load("fashion-mnist", split=split)
        message = single_line(e)
        assert str(tmp_path) in message and first in message and "apt-get install dataset-fashion-mnist" in message
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # a partial copy: the missing file is named
    with pytest.raises(FileNotFoundError) as e:
        data.load("fashion-mnist")
    assert "lacks train-labels-idx1-ubyte.gz:" in single_line(e)


# --- writes: a failure half-way leaves the previous file, never a torn one -------------------------------------

def test_figures_images_and_q_files_are_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    import analysis

    class Torn(Exception):
        pass

    def torn(self, *args, **kwargs):  # writes half a file, then dies
        Path(args[0] if args else kwargs["fp"]).write_bytes(b"half a file")
        raise Torn()

    for name, write in (("figure.png", lambda p: analysis.save_figure(Figure(), p)),
                        ("image.png", lambda p: analysis.save_image(Image.new("RGB", (4, 4)), p))):
        path = tmp_path / name
        path.write_bytes(b"the previous version")
        with monkeypatch.context() as m:
            m.setattr(Figure, "savefig", torn)
            m.setattr(Image.Image, "save", torn)
            with pytest.raises(Torn):
                write(path)
        assert path.read_bytes() == b"the previous version" and sorted(tmp_path.iterdir()) == [path]
        write(path)  # the control: without the failure it is replaced
        assert Image.open(path).size[0] > 0 and sorted(tmp_path.iterdir()) == [path]
        path.unlink()

    q = tmp_path / "x.q"
    q.write_bytes(b"the previous version")
    real_write = Path.write_bytes

    def torn_write(self, payload):
        real_write(self, payload[:10])
        raise Torn()

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", torn_write)
        with pytest.raises(Torn):
            codec.save_q(q, torch.zeros(16), identity="abc")
    assert q.read_bytes() == b"the previous version" and sorted(tmp_path.iterdir()) == [q]
    codec.save_q(q, torch.zeros(16), identity="abc")
    assert codec.load_q(q, identity="abc").shape == (16,)
    with pytest.raises(ValueError, match="unknown image file extension ''"):
        analysis.save_image(Image.new("RGB", (4, 4)), tmp_path / "no_suffix")
