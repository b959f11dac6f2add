"""What a model gets after its training loop: its replay features (what taught head rows are
fitted against, service/core/taught.py; `fill_replay`) and its ood_score's calibration
(core/novelty.py; `calibrate_novelty`: the Gaussians on the memory, the abstain threshold on
the validation split). Both run at the end of training, or afterwards on a stored model trained
before they existed (`retrofit_model`, a model-store operation: load, rebuild, save as a new
version). Both read the same seeded training split, so a retrofitted model holds what training
would have made.

`retrofit_engine` gives a stored model a CPU inference engine (core/engine.py, docs/engine.md):
the quantised network, the memory re-embedded by it (and by eager, so that both key sets
exist), the replay features, novelty and routing threshold made again from those keys, and
the accuracy gate against the model as shipped; saved as a new version only when it passes.

Its own module rather than store.py: store.py is the on-disk format and reads no data sets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import Dataset, Split, carve_validation, keep_classes, load_dataset, normalize, stratified_indices, \
    subset, validation_of
from .evaluation import EvalResult, choose_threshold, collect_predictions, evaluate, threshold_sweep
from .model import ClassifierConfig, EnhancedClassifier
from .online_choice import choose_on_images
from .store import EAGER, EngineVariant, ENGINE_STATE_PREFIXES, is_engine_file, is_index, load_model, model_dir, \
    save_model
from .train_config import TrainConfig

ABSTAIN_SHARE = 0.05  # validation images over the ood threshold: "none of these" for at most this share
NOVELTY_SHRINK = TrainConfig.novelty_shrink  # training's default (chosen on validation: bench/experiments/ood.py)
PROBE_WEIGHT = TrainConfig.novelty_probe_weight  # the same
PROBE_IMAGES = 10000  # training images (seeded, class-stratified) the probe's Gaussians are fitted on


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
                      train: tuple[torch.Tensor, torch.Tensor] | None = None, probe_weight: float = PROBE_WEIGHT,
                      seed: int = 0, abstain: float = ABSTAIN_SHARE, batch: int = 500) -> float | None:
    """Fit the ood_score's Gaussians on the memory (`shrink`: the covariance's shrinkage) and,
    where the model has a probe, `train` (uint8 (N, C, H, W) training images, (N,) labels) is
    given and `probe_weight` > 0, the probe's on PROBE_IMAGES of them (seeded, class-stratified)
    and each part's validation statistics; return the threshold over which at most `abstain` of
    the validation images (uint8 (N, C, H, W)) abstain; None when the model has no score or
    there is no validation image."""
    if model.novelty is None or not len(validation):
        return None
    model.eval()
    novelty, dev = model.novelty, model.memory.keys.device
    novelty.calibrate(model.memory, shrink)

    def encoded(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [model.encode(normalize(images[i:i + batch].to(dev), mean, std), probe=True)
                 for i in range(0, len(images), batch)]
        return torch.cat([k for k, _, _ in parts]), None if parts[0][2] is None else torch.cat([p for _, _, p in parts])

    if novelty.has_probe:
        novelty.probe_precision.zero_()  # unused unless fitted below
    keys, probes = encoded(validation)  # (N, D), (N, P) or None
    scores = novelty.score(model.memory, keys)  # (N,)
    if probes is not None and train is not None and probe_weight > 0:
        trained = (train[1] < model.config.num_classes).nonzero().squeeze(1)  # the head's classes
        pick = trained[stratified_indices(train[1][trained], min(PROBE_IMAGES, len(trained)), seed)]
        novelty.calibrate_probe(encoded(train[0][pick])[1], train[1][pick], shrink)
        novelty.set_standard(scores, novelty.probe_score(probes), probe_weight)
        scores = novelty.combine(scores, probes)
    novelty.detach_from(model.memory)  # training's later writes (if any) are not followed
    return float(torch.quantile(scores.double().cpu(), 1 - abstain))


def with_probe(model: EnhancedClassifier) -> EnhancedClassifier:
    """`model` itself, or, for a model saved before the ood_score's probe existed whose backbone
    has one, the same model with room for the probe's Gaussians (uncalibrated)."""
    if model.novelty is None or model.novelty.has_probe or not getattr(model.backbone, "probe_dim", 0):
        return model
    rebuilt = EnhancedClassifier(ClassifierConfig(**{**model.config.to_dict(), "novelty_probe": True}))
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("novelty.") for k in missing):
        raise ValueError(f"state does not fit the model with a probe ({missing[:3]}, {unexpected[:3]})")
    rebuilt.policy = model.policy
    if rebuilt.memory is not None:
        rebuilt.memory._recount()
    return rebuilt.eval()


def retrofit_model(store, name: str, per_class: int, data_dir: str | None = None,
                   policy: dict | None = None, ds: Dataset | None = None,
                   novelty_shrink: float = NOVELTY_SHRINK, choose_online: bool = False,
                   probe_weight: float = PROBE_WEIGHT) -> Path:
    """Give a model trained before training kept them its replay features (the same seeded
    pick from the same training split, rebuilt from the manifest) and, where given, the
    taught-row policy settings (None values: keep); with `choose_online` the online-learning
    settings chosen on its validation split as training chooses them (over the flags); saved
    as a new version, its reports and other settings kept. Returns the model's folder."""
    loaded = load_model(store, name)
    record, manifest = loaded.manifest.get("data") or {}, loaded.manifest
    if "validation_size" not in record or "dataset" not in record:
        raise ValueError(f"{name}: the manifest does not record its training split (data.dataset, validation_size)")
    ds = load_dataset(record["dataset"], data_dir) if ds is None else ds
    if record.get("exclude_classes"):
        ds = keep_classes(ds, record["exclude_classes"])
    train, val, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    config = ClassifierConfig(**{**loaded.model.config.to_dict(), "replay_per_class": per_class, "novelty": True,
                                 "novelty_probe": True})
    model = EnhancedClassifier(config)
    made_here = ("taught.", "novelty.")  # replaced
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith(made_here)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(made_here) for k in missing):
        raise ValueError(f"{name}: state does not fit the model with replay ({missing[:3]}, {unexpected[:3]})")
    model.policy = loaded.model.policy.replace(**(policy or {}))
    # training seeds the pick with its seed, which is also the validation split's
    fill_replay(model, train.images, train.labels, loaded.input.mean, loaded.input.std, record["validation_seed"])
    threshold = calibrate_novelty(model, val.images, loaded.input.mean, loaded.input.std, novelty_shrink,
                                  (train.images, train.labels), probe_weight, record["validation_seed"])
    model.policy = model.policy.replace(ood_threshold=threshold)
    if choose_online:  # as training does (online_choice.py)
        model.policy, found = choose_on_images(model, val.images, val.labels, loaded.input.mean, loaded.input.std,
                                               model.policy, record["validation_seed"])
        print(f"online learning: {found.get('chosen')} chosen on {found['chosen_on']}")
    if manifest.get("engine"):  # its keys and replay were made from the memory this replaces
        print(f"note: the {manifest['engine']['name']} engine is dropped (its keys belong to the previous memory); "
              f"make it again with `python -m service retrofit --name {name} --engine {manifest['engine']['name']}`")
    return save_model(store, name, model, loaded.classes, loaded.input, metrics=manifest.get("metrics"),
                      reports=_reports(store, name, manifest), splits=record)


def _reports(store, name: str, manifest: dict) -> dict[str, bytes]:
    """The model's report files (metrics, plots), to keep in a new version."""
    d = model_dir(store, name)
    return {f: (d / f).read_bytes() for f in manifest["artifacts"]
            if not f.endswith(".safetensors") and not is_engine_file(f) and not is_index(f)}


# --- a CPU inference engine ----------------------------------------------------------------------
GATE_MAX_DROP = 0.3  # points of routed validation accuracy the engine may lose against eager as shipped (issue 23)
CALIBRATION_IMAGES = 1024  # what bench/perf/cpu_engines.py calibrated with
SPEED_BATCH = 32


class EngineRefused(Exception):
    """The engine failed its accuracy gate: nothing was written."""


@dataclass
class EngineReport:
    engine: str
    gate: dict
    variants: dict[str, dict] = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    saved: Path | None = None


def _routed(model: EnhancedClassifier, val: Split, mean, std, policy) -> tuple[dict, EvalResult]:
    preds = collect_predictions(model, val.images, mean, std, policy)
    return preds, evaluate(preds, val.labels, policy, model.config.num_classes)


@torch.no_grad()
def refill_memory(model: EnhancedClassifier, images: torch.Tensor, labels: torch.Tensor, mean, std,
                  batch: int = 500) -> None:
    """Empty the memory and write these training images' keys, as embedded by the model's
    current backbone: uint8 (N, C, H, W), (N,) with N <= capacity (each fills the next slot)."""
    old = model.memory
    if len(labels) > old.capacity:
        raise ValueError(f"{len(labels)} items for a memory of {old.capacity}")
    model.memory = type(old)(old.config)  # empty, same kind and settings
    model.eval()
    for i in range(0, len(labels), batch):
        x = normalize(images[i:i + batch], mean, std).contiguous(memory_format=torch.channels_last)
        model.memory.update(model.embed(x)[0].float(), labels[i:i + batch])


def _time_backbone(backbone, x: torch.Tensor, seconds: float) -> float:
    """Images/s of the backbone alone on batches like `x` (after a warm-up), this process's threads."""
    with torch.inference_mode():
        for _ in range(3):
            backbone(x)
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            backbone(x)
            n += 1
    return n * len(x) / (time.perf_counter() - t0)


def retrofit_engine(store, name: str, engine: str, calibration: int = CALIBRATION_IMAGES, seed: int = 0,
                    data_dir: str | None = None, policy: dict | None = None, ds: Dataset | None = None,
                    novelty_shrink: float | None = None, speed_seconds: float = 1.0, log=print,
                    choose_online: bool = False, probe_weight: float | None = None) -> EngineReport:
    """Give stored model `name` the CPU inference engine `engine` (core/engine.py), saved as a
    new version only when it passes the gate; EngineRefused (nothing written) otherwise.

    1. calibration: `calibration` images drawn (seeded, class-stratified) from the training
       split minus the model's validation split (rebuilt from the manifest): never validation
       or test images; the backbone is quantised on them;
    2. for each variant, eager and the engine: the memory refilled with the keys of as many
       training images as it holds (seeded, class-stratified, the same images for both), the
       replay features, the novelty Gaussians and abstain threshold, and the routing
       confidence threshold (the sweep's choice on the validation split) made again from them;
       with `choose_online`, first the online-learning settings (online_choice.py, on the
       eager variant: the engine serves with the same);
    3. the gate: the engine's routed accuracy on the validation split at most GATE_MAX_DROP
       points below the eager model as shipped;
    4. saved: the eager variant as the model's weights and memory, the engine's files and its
       variant beside them (store.py), the figures in the manifest's "engine" section."""
    from .engine import ENGINES, OpenVINOBackbone, library_versions, quantize_backbone

    if engine == EAGER or engine not in ENGINES:
        raise ValueError(f"--engine must be one of {[e for e in ENGINES if e != EAGER]}, got {engine!r}")
    if calibration < 1:
        raise ValueError(f"--calibration must be >= 1, got {calibration}")
    shipped = load_model(store, name)
    record, manifest = shipped.manifest.get("data") or {}, shipped.manifest
    config = shipped.model.config
    if "validation_size" not in record or "dataset" not in record or not record.get("validation_size"):
        raise ValueError(f"{name}: the manifest records no validation split (data.validation_size): the gate and "
                         "the thresholds are chosen on it; retrain the model with --validation-size")
    if shipped.model.exit_proj is not None:
        raise ValueError(f"{name}: an engine runs the whole backbone, and this model's memory reads an inner stage "
                         f"(exit_stage {config.exit_stage})")
    if config.memory not in ("none", "cached"):
        raise ValueError(f"{name}: a {config.memory} memory's values were learnt in training; re-embedding its keys "
                         "would reset them (engines support cached memories)")
    t0 = time.perf_counter()
    ds = load_dataset(record["dataset"], data_dir) if ds is None else ds
    val = validation_of(ds, record)  # checked against the recorded hash of its indices
    if record.get("exclude_classes"):
        ds = keep_classes(ds, record["exclude_classes"])
    train, _, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    mean, std = shipped.input.mean, shipped.input.std
    H = config.num_classes

    # the reference: the model as shipped (its memory from training, its thresholds)
    base_policy = shipped.policy.replace(**(policy or {}))
    _, reference = _routed(shipped.model, val, mean, std, shipped.policy)
    log(f"{name}: eager as shipped: routed accuracy {100 * reference.accuracy:.2f} % on {len(val.labels)} validation "
        f"images (head {100 * reference.head_accuracy:.2f} %, memory path {100 * reference.memory_usage:.1f} %)")

    calib_idx = stratified_indices(train.labels, calibration, seed)
    calib_x = normalize(subset(train, calib_idx).images, mean, std)
    t = time.perf_counter()
    files = quantize_backbone(shipped.model.backbone, calib_x)
    log(f"{engine}: backbone quantised on {len(calib_idx)} training images (seed {seed}) in "
        f"{time.perf_counter() - t:.1f} s")
    backbones = {EAGER: None, engine: OpenVINOBackbone(files[".xml"], files[".bin"])}

    memory = shipped.model.memory
    items = memory.size if memory is not None else 0
    mem_idx = stratified_indices(train.labels, items, seed) if items else torch.zeros(0, dtype=torch.int64)
    models, results, policies, variants = {}, {}, {}, {}
    for variant, backbone in backbones.items():
        model = with_probe(load_model(store, name).model)  # its own copy of the shipped state, rebuilt below
        if backbone is not None:
            model.backbone = backbone
        model.eval()
        if memory is not None:
            refill_memory(model, train.images[mem_idx], train.labels[mem_idx], mean, std)
        fill_replay(model, train.images, train.labels, mean, std, record["validation_seed"])
        shrink = novelty_shrink if novelty_shrink is not None else (
            float(model.novelty.shrink) if model.novelty is not None and model.novelty.calibrated else NOVELTY_SHRINK)
        novelty = model.novelty
        weight = probe_weight if probe_weight is not None else (
            float(novelty.probe_weight) if novelty is not None and novelty.probe_calibrated else PROBE_WEIGHT)
        ood = calibrate_novelty(model, val.images, mean, std, shrink, (train.images, train.labels), weight, seed)
        if choose_online and variant == EAGER:  # the online settings: one choice, on the eager network's keys
            base_policy, online = choose_on_images(model, val.images, val.labels, mean, std, base_policy,
                                                   record["validation_seed"])
            log(f"online learning: {online.get('chosen')} chosen on {online['chosen_on']}")
        preds = collect_predictions(model, val.images, mean, std, base_policy)
        sweep = threshold_sweep(preds, val.labels, base_policy, H)
        chosen = base_policy.replace(confidence_threshold=choose_threshold(sweep), ood_threshold=ood)
        result = evaluate(preds, val.labels, chosen, H)
        models[variant], results[variant], policies[variant] = model, result, chosen
        variants[variant] = {"routed_accuracy": result.accuracy, "head_accuracy": result.head_accuracy,
                             "memory_usage": result.memory_usage,
                             "confidence_threshold": chosen.confidence_threshold, "ood_threshold": ood}
        log(f"{variant}: memory re-embedded ({items} training items), threshold {chosen.confidence_threshold}: routed "
            f"accuracy {100 * result.accuracy:.2f} % (head {100 * result.head_accuracy:.2f} %, memory path "
            f"{100 * result.memory_usage:.1f} %)")
    drop = 100 * (reference.accuracy - results[engine].accuracy)
    gate = {"metric": "routed accuracy on the validation split", "validation_images": len(val.labels),
            "reference": "eager as shipped", "reference_accuracy": reference.accuracy,
            "accuracy": results[engine].accuracy, "drop_points": drop, "max_drop_points": GATE_MAX_DROP,
            "passed": drop <= GATE_MAX_DROP}
    report = EngineReport(engine, gate, variants)

    x = normalize(val.images[:SPEED_BATCH], mean, std).contiguous()
    if speed_seconds > 0:
        eager_bb = models[EAGER].backbone.eval().to(memory_format=torch.channels_last)  # as served (for_inference)
        rates = {EAGER: _time_backbone(eager_bb, x.contiguous(memory_format=torch.channels_last), speed_seconds),
                 engine: _time_backbone(backbones[engine], x, speed_seconds)}
        report.speed = {"batch": len(x), "threads": torch.get_num_threads(), "backbone_images_per_s": rates,
                        "ratio": rates[engine] / rates[EAGER],
                        "note": "the backbone alone, measured once during the retrofit (a quiet machine: "
                                "bench/perf/cpu_engines.py)"}
        log(f"speed (backbone, batch {len(x)}, {torch.get_num_threads()} threads): eager {rates[EAGER]:.0f} images/s, "
            f"{engine} {rates[engine]:.0f} images/s ({report.speed['ratio']:.2f}x)")
    verdict = "passed" if gate["passed"] else "FAILED"
    log(f"gate {verdict}: {engine} {100 * gate['accuracy']:.2f} % vs eager as shipped "
        f"{100 * gate['reference_accuracy']:.2f} %: {drop:.2f} points lost (at most {GATE_MAX_DROP})")
    if not gate["passed"]:
        raise EngineRefused(f"the {engine} engine loses {drop:.2f} points of routed validation accuracy (at most "
                            f"{GATE_MAX_DROP} allowed): refused, model {name!r} left as it was (serve it eager)")

    state = {k: v for k, v in models[engine].state_dict().items() if k.startswith(ENGINE_STATE_PREFIXES)}
    engine_policy = policies[engine]
    variant = EngineVariant(
        name=engine, files=files, state=state,
        routing={"confidence_threshold": engine_policy.confidence_threshold,
                 "ood_threshold": engine_policy.ood_threshold},
        record={"library": library_versions(), "quantization": {"tool": "nncf.quantize", "preset": "PERFORMANCE",
                                                                 "non_int8_precision": "f32"},
                "calibration": {"images": len(calib_idx), "seed": seed, "class_stratified": True,
                                "split": "training minus validation"},
                "memory": {"items": items, "seed": seed, "class_stratified": True,
                           "split": "training minus validation",
                           "note": "both variants' memories hold the keys of these images, each by its own network"},
                "gate": gate, "variants": variants, "speed": report.speed,
                "made_in_s": round(time.perf_counter() - t0, 1)})
    eager = models[EAGER]
    eager.policy = policies[EAGER]
    report.saved = save_model(store, name, eager, shipped.classes, shipped.input, metrics=manifest.get("metrics"),
                              reports=_reports(store, name, manifest), splits=record, engine=variant)
    return report
