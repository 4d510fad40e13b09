"""Our safetensors weight files: tensors plus the metadata that rebuilds the model.

Metadata keys (all values are strings; JSON where structured):
  format   -- ``FORMAT``, a version tag of ours; a file without it is not one of ours
  task     -- the task that trained the weights (e.g. ``finola``), or ``""``
  model    -- JSON ``{"arch": NAME, "config": {...}}``: ``build`` rebuilds the module (``architectures()[NAME]``)
  train    -- JSON of the run's flags;  data -- the data source string;  metrics -- JSON of final metrics

``load_model(path)`` is the one function that rebuilds any of our models from a file alone.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "finola-weights/1"

MODEL_MODULES = ("mobileformer", "mae", "autoencoder", "masked", "classify", "detr")  # where our architectures live


@functools.cache
def architectures() -> dict[str, type]:
    """Arch name -> class: every class of ``MODEL_MODULES`` that declares its own ``arch``. Each follows one contract
    (layers.EncoderModel; the encoders themselves, MobileFormer and ViT, have none): ``build`` rebuilds it from the
    ``config_dict()`` its file stores."""
    found = {}
    for module in map(importlib.import_module, MODEL_MODULES):
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__ and "arch" in vars(cls):
                found[cls.arch] = cls
    return found


def is_encoder(arch: str) -> bool:
    """Whether ``arch`` is an encoder itself (MobileFormer, ViT); every other model holds one as ``model.encoder``."""
    return not hasattr(architectures()[arch], "split")


def arch_of(model: torch.nn.Module) -> str:
    """The ``architectures`` name of ``model``'s class."""
    arch = vars(type(model)).get("arch")
    if arch is None or architectures().get(arch) is not type(model):
        raise ValueError(f"model: {type(model).__name__} is none of our architectures ({sorted(architectures())})")
    return arch


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name in ``path``'s folder; on success rename it to ``path`` (``os.replace``, atomic on one
    filesystem), on any error remove it. A kill at any moment leaves either the old file or the new one, never a
    torn one. Used for every file a run writes: weights, figures, ``.q`` files, ``args.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path, state_dict: dict[str, torch.Tensor], *, arch: str, config: dict, task: str = "",
         train: dict | None = None, data: str = "", metrics: dict | None = None) -> Path:
    """Write ``state_dict`` and our metadata to ``path`` atomically (temporary file, then rename)."""
    if arch not in architectures():
        raise ValueError(f"arch: unknown architecture {arch!r}; expected one of {sorted(architectures())}")
    path = Path(path)
    meta = {
        "format": FORMAT,
        "task": task,
        "model": json.dumps({"arch": arch, "config": config}),
        "train": json.dumps(train or {}),
        "data": data,
        "metrics": json.dumps(metrics or {}),
    }
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def save_model(path, model: torch.nn.Module, **metadata) -> Path:
    """``save`` for one of our models: its state, its arch (``arch_of``) and its ``config_dict()``, with its encoder's
    arch under "encoder_arch" for a model on an encoder; ``metadata``: ``save``'s task / train / data / metrics."""
    arch, config = arch_of(model), model.config_dict()
    if not is_encoder(arch):
        config["encoder_arch"] = arch_of(model.encoder)
    return save(path, model.state_dict(), arch=arch, config=config, **metadata)


def one_line(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (for messages that quote a library's)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


HUB = "hf:"  # hf:ORG/REPO[/FILE]: a file of a HuggingFace hub repository (default FILE: model.safetensors)


def resolve(path) -> Path:
    """A local file for ``path``: itself, or for ``hf:ORG/REPO[/FILE]`` the hub file through ``huggingface_hub``'s
    cache (downloaded once; with ``HF_HUB_OFFLINE=1`` the cache alone, and a clear error when it lacks the file)."""
    text = str(path)
    if not text.startswith(HUB):
        return Path(path)
    parts = text[len(HUB):].split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"weights: {text!r}: expected hf:ORG/REPO or hf:ORG/REPO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, EntryNotFoundError
    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"weights: {text!r}: not in the hub cache ({constants.HF_HUB_CACHE}) and the hub is "
            f"{'off (HF_HUB_OFFLINE=1)' if constants.HF_HUB_OFFLINE else 'unreachable'}; download it where the hub "
            f"is reachable, or give a local file") from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"weights: {text!r}: no such repository or file on the hub ({one_line(e)})") from e


def read_metadata(path) -> dict:
    """The parsed metadata of one of our files (JSON fields decoded); a clear error for anything else. ``path`` may
    be ``hf:ORG/REPO[/FILE]`` (``resolve``), as everywhere a weights file is read."""
    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"weights: {str(path)!r} is not a safetensors file ({one_line(e)})") from e
    if raw.get("format") != FORMAT:
        raise ValueError(f"weights: {str(path)!r} is not a finola weights file "
                         f"(metadata 'format' is {raw.get('format')!r}, expected {FORMAT!r})")
    meta = dict(raw)
    for key in ("model", "train", "metrics"):
        try:
            meta[key] = json.loads(raw.get(key) or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"weights: {str(path)!r}: metadata {key!r} is not valid JSON ({e})") from e
        if not isinstance(meta[key], dict):
            raise ValueError(f"weights: {str(path)!r}: metadata {key!r} should be a JSON object, got "
                             f"{type(meta[key]).__name__}")
    return meta


def read(path, *, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)`` of one of our files."""
    path = resolve(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a file cut short after its header, a tensor safetensors cannot read
        raise ValueError(f"weights: {str(path)!r}: cannot read its tensors ({one_line(e)})") from e
    return tensors, meta


def build(model_meta: dict, *, source: str = "metadata") -> torch.nn.Module:
    """A fresh (randomly initialised) module from the ``model`` metadata ``{"arch", "config"}``; ``source`` names
    where it came from in errors (e.g. the file)."""
    arch = model_meta.get("arch")
    if arch not in architectures():
        raise ValueError(f"weights: {source}: unknown architecture {arch!r} in metadata 'model'; expected one of "
                         f"{sorted(architectures())}")
    if not isinstance(model_meta.get("config"), dict):
        raise ValueError(f"weights: {source}: metadata 'model' has no 'config' object for architecture {arch!r}")
    cls, config = architectures()[arch], model_meta["config"]
    try:
        if is_encoder(arch):
            return cls.from_config(config)
        _, encoder_config, encoder_arch = cls.split(config)
        encoder = build({"arch": encoder_arch, "config": encoder_config}, source=source)  # errors of its own
        return cls.from_config(config, encoder=encoder)
    except (TypeError, KeyError, ValueError) as e:  # a config with unknown, missing or invalid fields
        if str(e).startswith("weights: "):  # the encoder's, already said in full
            raise
        raise ValueError(f"weights: {source}: the {arch!r} config in metadata 'model' does not build a model "
                         f"({type(e).__name__}: {one_line(e)})") from e


def _names(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """A one-line error when ``tensors`` do not fit ``module`` exactly (names and shapes)."""
    expected = module.state_dict()
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    shapes = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & tensors.keys()) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(names)}): {_names(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if names]
        raise ValueError(f"weights: {source}: tensors do not match the model its metadata describes "
                         f"({'; '.join(parts)})")


def load_model(path, *, device="cpu") -> torch.nn.Module:
    """Rebuild one of our models from a ``.safetensors`` file alone, weights loaded, in eval mode."""
    tensors, meta = read(path, device=device)
    source = repr(str(path))
    model = build(meta["model"], source=source).to(device)
    check_tensors(model, tensors, source)
    model.load_state_dict(tensors, strict=True)
    model.metadata = meta
    return model.eval()


def load_encoder(path, *, device="cpu") -> torch.nn.Module:
    """The Mobile-Former encoder (no classifier) of any of our weight files: pre-trained FINOLA (vanilla or
    masked), a supervised or plain encoder, a classifier's encoder, or a detector's backbone; trainable, in train
    mode. ``train.py --init`` uses it."""
    model = load_model(path, device=device)
    encoder = model if is_encoder(model.metadata["model"]["arch"]) else model.encoder
    if getattr(encoder, "head", None) is not None:  # a supervised classifier: keep the backbone only
        import dataclasses
        encoder.head = None
        encoder.config = dataclasses.replace(encoder.config, num_classes=0)
    return encoder.freeze(False).train()  # trainable again, also when it was a frozen probe's


def model_card(path) -> str:
    """A hub model card (README.md) for one of our files: what it is, its config, training flags, data and final
    metrics from its metadata, and the commands that use it."""
    meta = read_metadata(path)
    arch, train = meta["model"].get("arch"), meta["train"]
    metrics = "\n".join(f"| {k} | {v} |" for k, v in meta["metrics"].items()) or "| (none recorded) | |"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in train.items() if isinstance(v, (int, float, str))
                     and not isinstance(v, bool) and k not in ("out", "resume"))
    return f"""---
library_name: finola
tags: [finola, mobile-former, safetensors]
---
# {meta["task"] or arch}: a finola `{arch}` model

Weights written by `train.py --task {meta["task"]}` of finola, the reference library of *Image is First-order
Norm+Linear Autoregressive* (FINOLA). The file alone rebuilds the model: its metadata holds the config.

```python
import weights
model = weights.load_model("hf:ORG/REPO")  # this repository's model.safetensors
```

## Data
`{meta["data"]}`

## Final metrics
| metric | value |
|---|---|
{metrics}

## Training flags
```
{flags}
```

## Config
```json
{json.dumps(meta["model"], indent=1)}
```
"""


def export(path, out) -> Path:
    """A folder ready to upload to the hub: ``model.safetensors`` (a copy of ``path``) and ``README.md`` (its model
    card)."""
    import shutil
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = model_card(path)  # reads (and checks) the file first
    with atomic_path(out / "model.safetensors") as tmp:
        shutil.copyfile(resolve(path), tmp)
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(card)
    return out
