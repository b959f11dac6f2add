"""A model's replay features (what taught head rows are fitted against, service/core/taught.py):
filled at the end of training (`fill_replay`), or given afterwards to a stored model trained
before training kept them (`retrofit_model`, a model-store operation: load, rebuild, save as a
new version). Both draw the same seeded pick from the same training split, so a retrofitted
model holds what training would have kept.

Its own module rather than store.py: store.py is the on-disk format and reads no data sets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import Dataset, carve_validation, keep_classes, load_dataset, normalize
from .model import ClassifierConfig, EnhancedClassifier
from .store import load_model, model_dir, save_model


@torch.no_grad()
def fill_replay(model: EnhancedClassifier, images: torch.Tensor, labels: torch.Tensor, mean, std, seed: int) -> None:
    """The model's replay features: eval-mode features of `replay_per_class` seeded training
    images of every class. images (N, C, H, W) uint8, labels (N,) -> replay_features
    (num_classes * replay_per_class, D), replay_labels (num_classes * replay_per_class,)."""
    if model.taught is None:
        return
    n = model.config.replay_per_class
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(model.config.num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) < n:
            raise ValueError(f"--replay-per-class {n}: class {c} has only {len(idx)} training images")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    pick = torch.cat(picks)
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    feats = torch.cat([model.embed(normalize(images[b].to(device), mean, std).contiguous(
        memory_format=torch.channels_last))[1] for b in pick.split(500)])
    model.train(was_training)
    model.taught.replay_features.copy_(feats.float())
    model.taught.replay_labels.copy_(labels[pick])  # copy_ brings them to the buffer's device


def retrofit_model(store, name: str, per_class: int, data_dir: str | None = None,
                   policy: dict | None = None, ds: Dataset | None = None) -> Path:
    """Give a model trained before training kept them its replay features (the same seeded
    pick from the same training split, rebuilt from the manifest) and, where given, the
    taught-row policy settings (None values: keep); saved as a new version, its reports and
    other settings kept. Returns the model's folder."""
    loaded = load_model(store, name)
    record, manifest = loaded.manifest.get("data") or {}, loaded.manifest
    if "validation_size" not in record or "dataset" not in record:
        raise ValueError(f"{name}: the manifest does not record its training split (data.dataset, validation_size)")
    ds = load_dataset(record["dataset"], data_dir) if ds is None else ds
    if record.get("exclude_classes"):
        ds = keep_classes(ds, record["exclude_classes"])
    train, _, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    config = ClassifierConfig(**{**loaded.model.config.to_dict(), "replay_per_class": per_class})
    model = EnhancedClassifier(config)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("taught.")}  # replaced
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("taught.") for k in missing):
        raise ValueError(f"{name}: state does not fit the model with replay ({missing[:3]}, {unexpected[:3]})")
    model.policy = loaded.model.policy.replace(**(policy or {}))
    # training seeds the pick with its seed, which is also the validation split's
    fill_replay(model, train.images, train.labels, loaded.input.mean, loaded.input.std, record["validation_seed"])
    d = model_dir(store, name)
    reports = {f: (d / f).read_bytes() for f in manifest["artifacts"] if not f.endswith(".safetensors")}
    return save_model(store, name, model, loaded.classes, loaded.input, metrics=manifest.get("metrics"),
                      reports=reports, splits=record)
