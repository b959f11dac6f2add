"""What a model gets after its training loop: its replay features (what taught head rows are
fitted against, service/core/taught.py; `fill_replay`) and its ood_score's calibration
(core/novelty.py; `calibrate_novelty`: the Gaussians on the memory, the abstain threshold on
the validation split). Both run at the end of training, or afterwards on a stored model trained
before they existed (`retrofit_model`, a model-store operation: load, rebuild, save as a new
version). Both read the same seeded training split, so a retrofitted model holds what training
would have made.

Its own module rather than store.py: store.py is the on-disk format and reads no data sets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import Dataset, carve_validation, keep_classes, load_dataset, normalize
from .model import ClassifierConfig, EnhancedClassifier
from .store import load_model, model_dir, save_model
from .train_config import TrainConfig

ABSTAIN_SHARE = 0.05  # validation images over the ood threshold: "none of these" for at most this share
NOVELTY_SHRINK = TrainConfig.novelty_shrink  # training's default (chosen on validation: bench/experiments/ood.py)


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


@torch.no_grad()
def calibrate_novelty(model: EnhancedClassifier, validation: torch.Tensor, mean, std, shrink: float,
                      abstain: float = ABSTAIN_SHARE, batch: int = 500) -> float | None:
    """Fit the ood_score's Gaussians on the memory (`shrink`: the covariance's shrinkage) and
    return the threshold over which at most `abstain` of the validation images (uint8 (N, C,
    H, W)) abstain; None when the model has no score or there is no validation image."""
    if model.novelty is None or not len(validation):
        return None
    model.eval()
    model.novelty.calibrate(model.memory, shrink)
    dev = model.memory.keys.device
    scores = torch.cat([model.novelty.score(model.memory, model.embed(normalize(validation[i:i + batch].to(dev), mean,
                                                                                 std))[0])
                        for i in range(0, len(validation), batch)])  # (N,)
    model.novelty.detach_from(model.memory)  # training's later writes (if any) are not followed
    return float(torch.quantile(scores.double().cpu(), 1 - abstain))


def retrofit_model(store, name: str, per_class: int, data_dir: str | None = None,
                   policy: dict | None = None, ds: Dataset | None = None,
                   novelty_shrink: float = NOVELTY_SHRINK) -> Path:
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
    train, val, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    config = ClassifierConfig(**{**loaded.model.config.to_dict(), "replay_per_class": per_class, "novelty": True})
    model = EnhancedClassifier(config)
    made_here = ("taught.", "novelty.")  # replaced
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith(made_here)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(made_here) for k in missing):
        raise ValueError(f"{name}: state does not fit the model with replay ({missing[:3]}, {unexpected[:3]})")
    model.policy = loaded.model.policy.replace(**(policy or {}))
    # training seeds the pick with its seed, which is also the validation split's
    fill_replay(model, train.images, train.labels, loaded.input.mean, loaded.input.std, record["validation_seed"])
    threshold = calibrate_novelty(model, val.images, loaded.input.mean, loaded.input.std, novelty_shrink)
    model.policy = model.policy.replace(ood_threshold=threshold)
    d = model_dir(store, name)
    reports = {f: (d / f).read_bytes() for f in manifest["artifacts"] if not f.endswith(".safetensors")}
    return save_model(store, name, model, loaded.classes, loaded.input, metrics=manifest.get("metrics"),
                      reports=reports, splits=record)
