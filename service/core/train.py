"""The training experiment: train, evaluate per epoch, choose the routing threshold on the
validation split, report on the test set, time inference, save the model and its reports.

Splits: `validation_size` images (seeded, class-stratified) are carved out of the training
set before training; they choose the confidence threshold (and per-epoch curves use them).
The test set is evaluated once, at the end, with the chosen policy: it only reports.

    loss = cross_entropy(head(features), y) + memory_loss_weight * memory.contrastive_loss(features, y)
    after each step: memory.update(features, y)

Launched by `torchrun --nproc_per_node N -m service train ...` it trains data-parallel, with one
memory kept identical on every process (distributed.py). With --checkpoint-dir, the state at
the end of every epoch is written (checkpoint.py) and --resume continues from it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import (Dataset, Split, augment, carve_validation, fold_in, keep_classes, load_dataset, normalize,
                   stratified_indices, subset)
from .model import ClassifierConfig, EnhancedClassifier
from .routing import RoutingPolicy, route
from .store import InputSpec, save_model, sha256_bytes

SWEEP_THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    """Data set: fashion-mnist, cifar10 or imagefolder."""
    data_dir: str | None = None
    """Folder (or .zip for imagefolder/cifar10) holding the data set."""
    download: bool = False
    """Allow torchvision to download the data set (needs the internet)."""
    name: str = "fashion-mnist"
    """Model name: the folder written under --store."""
    store: str = "model_store"
    """Model store folder."""
    epochs: int = 5
    """Training epochs."""
    batch_size: int = 128
    """Training batch size."""
    lr: float = 0.1
    """Peak learning rate of the one-cycle SGD schedule."""
    weight_decay: float = 5e-4
    """SGD weight decay (not applied to memory parameters)."""
    memory_loss_weight: float = 0.4
    """Weight of the contrastive memory loss added to cross-entropy."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    augment_pad: int | None = None
    """Random translation in pixels (default 0 for 28 px images, 4 for larger: a crop with padding)."""
    flip: bool = True
    """Random horizontal flips in training."""
    exclude_classes: list[str] = field(default_factory=list)
    """Class names left out of training and test (to teach them later through feedback)."""
    extra_memory_classes: int = 10
    """Room in the memory's label space for new classes taught later by feedback."""
    precision: str = "auto"
    """Training matmul precision: bf16, fp32, or auto (bf16 where the CPU has native support)."""
    seed: int = 0
    """Random seed."""
    validation_size: int = 5000
    """Training images held out (seeded, class-stratified) to choose the threshold; 0 = none."""
    choose_threshold: bool = True
    """Choose --confidence-threshold on the validation split (most accurate of the sweep); off: keep the flag."""
    limit_train: int | None = None
    """Train on a seeded, class-stratified subset of N images (quick runs and tests)."""
    limit_test: int | None = None
    """Test on a seeded, class-stratified subset of N images."""
    progress: bool = True
    """Show tqdm progress bars."""
    device: str = "cpu"
    """Where the network trains: cpu or cuda (a GPU per process, NCCL between processes; the memory stays on CPU)."""
    checkpoint_dir: str | None = None
    """Write a checkpoint (model and memory, optimiser, schedule, RNG) here at the end of every epoch."""
    resume: bool = False
    """Continue from the last finished epoch of the checkpoint in --checkpoint-dir (start afresh when it holds none)."""
    check_memory_sync: bool = True
    """Across processes: compare a sha256 of every process's memory after each epoch; stop the run if any differs."""
    dist_timeout: float = 600.0
    """Across processes: seconds a process waits for the others (a collective, the final save) before the run fails."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.memory_loss_weight < 0:
            raise ValueError(f"--memory-loss-weight must be >= 0, got {self.memory_loss_weight}")
        if self.validation_size < 0:
            raise ValueError(f"--validation-size must be >= 0, got {self.validation_size}")
        if self.choose_threshold and self.validation_size == 0:
            raise ValueError("--choose-threshold needs a validation split (--validation-size > 0); "
                             "pass --no-choose-threshold to keep --confidence-threshold")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir (the folder the interrupted run wrote)")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0, got {self.dist_timeout}")

    def use_bf16(self) -> bool:
        if self.precision == "auto":
            if self.device == "cuda":
                return torch.cuda.is_bf16_supported()
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return self.precision == "bf16"


# settings that may change between an interrupted run and its --resume
RUN_ONLY = ("data_dir", "download", "name", "store", "progress", "device", "checkpoint_dir", "resume",
            "check_memory_sync", "dist_timeout")


@dataclass
class EvalResult:
    accuracy: float  # routed prediction
    head_accuracy: float  # network path for every sample
    memory_usage: float  # share answered on the memory path
    memory_path_accuracy: float  # accuracy of those (nan if none)


@torch.no_grad()
def collect_predictions(model: EnhancedClassifier, images: torch.Tensor, mean, std, policy: RoutingPolicy,
                        batch_size: int = 500, comm: distributed.Comm | None = None) -> dict[str, torch.Tensor]:
    """Head and memory answers for every image (eval mode, fp32): the raw material of
    evaluation and of the threshold sweep (which varies only the threshold, so the memory
    is read once, with the policy's neighbours and class balance). Across processes (`comm`)
    each reads its part of the images and every process gets every answer."""
    model.eval()
    device = model.head.weight.device  # the memory stays on the CPU
    part = images if comm is None else images[comm.part(len(images))]
    none = torch.zeros(0, dtype=torch.int64)  # a process with no part still gathers
    out: dict[str, list] = {"head": [none], "mem_label": [none], "mem_conf": [torch.zeros(0)]}
    for i in range(0, len(part), batch_size):
        x = normalize(part[i:i + batch_size], mean, std).to(device).contiguous(memory_format=torch.channels_last)
        logits, keys = model(x)
        r = model.retrieve(keys.float().cpu(), policy)
        out["head"].append(logits.argmax(-1).cpu())
        out["mem_label"].append(r.labels)
        out["mem_conf"].append(r.confidence)
    preds = {k: torch.cat(v) for k, v in out.items()}
    return preds if comm is None else {k: comm.gather_rows(v, len(images)) for k, v in preds.items()}


def evaluate(preds: dict[str, torch.Tensor], labels: torch.Tensor, policy: RoutingPolicy,
             head_classes: int) -> EvalResult:
    used = route(preds["mem_label"], preds["mem_conf"], policy, head_classes)  # (N,)
    routed = torch.where(used, preds["mem_label"], preds["head"])
    mem_acc = (preds["mem_label"][used] == labels[used]).float().mean().item() if used.any() else float("nan")
    return EvalResult(accuracy=(routed == labels).float().mean().item(),
                      head_accuracy=(preds["head"] == labels).float().mean().item(),
                      memory_usage=used.float().mean().item(), memory_path_accuracy=mem_acc)


def threshold_sweep(preds: dict[str, torch.Tensor], labels: torch.Tensor, policy: RoutingPolicy, head_classes: int,
                    thresholds: list[float] = SWEEP_THRESHOLDS) -> list[dict]:
    return [{"threshold": t, **asdict(evaluate(preds, labels, policy.replace(confidence_threshold=t), head_classes))}
            for t in thresholds]


def choose_threshold(sweep: list[dict]) -> float:
    """The sweep's most accurate threshold; among equals the lowest (the most memory answers)."""
    best = max(s["accuracy"] for s in sweep)
    return min(s["threshold"] for s in sweep if s["accuracy"] == best)


@torch.no_grad()
def evaluate_inference_speed(model: EnhancedClassifier, images: torch.Tensor, mean, std, n: int = 300) -> dict:
    """Per-sample cost, one image at a time (the service's latency case): milliseconds of
    feature extraction, memory retrieval and head, and the median total by path."""
    model.eval()
    per_path: dict[str, list[float]] = {"memory": [], "network": []}
    stages: dict[str, list[float]] = {"features": [], "memory": [], "head": []}
    for i in range(min(n + 10, len(images))):
        x = normalize(images[i:i + 1], mean, std).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        p = model.predict(x)
        total = 1e3 * (time.perf_counter() - t)
        if i < 10:  # warm-up
            continue
        per_path[p.paths[0]].append(total)
        for k, v in p.timings_ms.items():
            stages[k].append(v)

    def median(xs: list[float]) -> float:
        return float(torch.tensor(xs).median()) if xs else float("nan")
    result = {f"{k}_ms": median(v) for k, v in stages.items()}
    result.update({f"{k}_path_ms": median(v) for k, v in per_path.items()})
    result.update({f"{k}_path_samples": len(v) for k, v in per_path.items()})
    result["memory_over_network"] = result["memory_path_ms"] / result["network_path_ms"]
    return result


def _plot_training(history: list[dict], sweep: list[dict]) -> tuple[bytes, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(ep, [h["train_loss"] for h in history], "o-", label="total")
    ax[0, 0].plot(ep, [h["ce_loss"] for h in history], "o-", label="cross-entropy")
    ax[0, 0].set_title("training loss")
    ax[0, 1].plot(ep, [h["memory_loss"] for h in history], "o-", color="C2")
    ax[0, 1].set_title("memory (contrastive) loss")
    ax[1, 0].plot(ep, [h["train_accuracy"] for h in history], "o-", label="train (head)")
    ax[1, 0].plot(ep, [h["val_accuracy"] for h in history], "o-", label="validation (routed)")
    ax[1, 0].plot(ep, [h["val_head_accuracy"] for h in history], "o--", label="validation (head only)")
    ax[1, 0].set_title("accuracy")
    ax[1, 1].plot(ep, [h["memory_usage"] for h in history], "o-", label="memory-path share")
    ax[1, 1].plot(ep, [h["memory_fill"] for h in history], "o--", label="memory fill")
    ax[1, 1].set_title("memory usage")
    for a in ax.flat:
        a.set_xlabel("epoch")
        a.legend() if a.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)

    fig, a = plt.subplots(figsize=(6, 4))
    th = [s["threshold"] for s in sweep]
    a.plot(th, [s["memory_path_accuracy"] for s in sweep], "o-", label="memory-path accuracy")
    a.plot(th, [s["memory_usage"] for s in sweep], "o-", label="memory usage")
    a.plot(th, [s["accuracy"] for s in sweep], "o--", label="overall accuracy")
    a.set_xlabel("confidence threshold")
    a.legend()
    a.set_title("threshold sweep (validation split)")
    fig.tight_layout()
    buf2 = io.BytesIO()
    fig.savefig(buf2, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue(), buf2.getvalue()


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def build_model(tc: TrainConfig, cc: ClassifierConfig, ds: Dataset) -> EnhancedClassifier:
    cc.num_classes = len(ds.classes)
    cc.in_chans, cc.image_size = ds.in_chans, ds.image_size
    cc.memory_classes = cc.num_classes + tc.extra_memory_classes
    cc.__post_init__()
    return EnhancedClassifier(cc)


def train_step(model: EnhancedClassifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               memory_loss_weight: float, label_smoothing: float, bf16: bool, *,
               ddp: torch.nn.Module | None = None, comm: distributed.Comm | None = None,
               write_rows: int | None = None) -> tuple[float, float, float]:
    """One optimisation step, then the batch's features are written to memory.
    Returns (cross-entropy, memory loss, correct predictions).

    Across processes, `x, y` are this process's share of the global batch, `ddp` the
    DistributedDataParallel wrapper of `model` (gradients averaged) and `comm` gathers every
    share: each process writes the whole global batch (its first `write_rows` rows: not the
    padding of a last batch) in rank order, with similarities computed from that one gathered
    tensor, so every memory receives the same writes (distributed.py)."""
    memory = model.memory
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits, features = (ddp or model)(x)  # (B, num_classes), (B, D)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    sim_dtype = torch.bfloat16 if bf16 and device == "cpu" else None
    write_x, write_y = features.detach().float().cpu(), y.cpu()  # what the memory is written
    if comm is not None and memory is not None:
        write_x, write_y = comm.gather_batch(features, y)  # (W*B, D), (W*B,)
    mem_loss, write_sims = torch.zeros(()), None
    if memory is not None and memory_loss_weight > 0 and memory.size:
        # one similarity matrix serves the loss and the write that follows
        sims = memory.similarity(features.float().cpu(), sim_dtype)  # (B, M)
        mem_loss = memory.contrastive_loss(features.cpu(), y.cpu(), similarity=sims)
        write_sims = sims.detach()
        if comm is not None:  # the gathered batch against the memory before this step's writes and update
            with torch.no_grad():
                write_sims = memory.similarity(write_x, sim_dtype)  # (W*B, M)
    loss = ce + memory_loss_weight * mem_loss.to(ce.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if comm is not None and write_sims is not None:  # the loss read the memory: on every process alike
        comm.average_gradients(list(memory.parameters()))
    opt.step()
    if memory is not None:
        n = len(write_y) if write_rows is None else write_rows
        memory.update(write_x[:n], write_y[:n], similarity=None if write_sims is None else write_sims[:n])
    return ce.item(), mem_loss.item(), (logits.argmax(-1) == y).sum().item()


def make_optimizer(model: EnhancedClassifier, tc: TrainConfig, total_steps: int):
    memory_params = [p for n, p in model.named_parameters() if n.startswith("memory.")]
    decay = [p for n, p in model.named_parameters() if not n.startswith("memory.") and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if not n.startswith("memory.") and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if memory_params:
        # no momentum: slots are rewritten every few steps, so momentum would carry over from
        # the item a slot held before; it also halves the optimiser's work on 10,000 x D keys
        groups.append({"params": memory_params, "weight_decay": 0.0, "momentum": 0.0, "nesterov": False})
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=0.9, nesterov=True)
    no_momentum = [g["momentum"] == 0.0 for g in groups]  # OneCycleLR would otherwise cycle it in
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tc.lr, total_steps=total_steps, pct_start=0.25,
        base_momentum=[0.0 if z else 0.85 for z in no_momentum], max_momentum=[0.0 if z else 0.95 for z in no_momentum])
    return opt, sched


@torch.no_grad()
def fill_replay(model: EnhancedClassifier, images: torch.Tensor, labels: torch.Tensor, mean, std, seed: int) -> None:
    """The model's replay features (what taught head rows are fitted against): eval-mode
    features of `replay_per_class` seeded training images of every class."""
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
    feats = torch.cat([model.embed(normalize(images[b], mean, std).contiguous(memory_format=torch.channels_last))[1]
                       for b in pick.split(500)])
    model.train(was_training)
    model.taught.replay_features.copy_(feats.float())
    model.taught.replay_labels.copy_(labels[pick])


def retrofit_model(store, name: str, per_class: int, data_dir: str | None = None,
                   policy: dict | None = None, ds: Dataset | None = None) -> Path:
    """Give a model trained before training kept them its replay features (the same seeded
    pick from the same training split, rebuilt from the manifest) and, where given, the
    taught-row policy settings; saved as a new version, its reports and other settings kept."""
    from .store import load_model, model_dir

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


def place(model: EnhancedClassifier, device: str) -> EnhancedClassifier:
    """The network on `device`; the memory stays on the CPU (its writes, the service's home)."""
    for name, child in model.named_children():
        if name != "memory":
            child.to(device)
    return model


def settings_fingerprint(tc: TrainConfig, cc: ClassifierConfig, policy: RoutingPolicy, train_size: int) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint, flat and
    as JSON gives them back."""
    fp = {k: v for k, v in asdict(tc).items() if k not in RUN_ONLY}
    fp |= {f"classifier.{k}": v for k, v in cc.to_dict().items()}
    fp |= {f"routing.{k}": v for k, v in policy.to_dict().items()}
    fp["train_size"] = train_size
    return json.loads(json.dumps(fp))


def restore(state: dict, fingerprint: dict, model: EnhancedClassifier, opt, sched, gen: torch.Generator,
            where: str) -> None:
    """Load a checkpoint's state into a freshly built run, refusing one written with other settings."""
    saved = state["fingerprint"]
    differ = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differ:
        raise CheckpointError(f"--resume: the checkpoint in {where} was written with other settings ("
                              + ", ".join(f"{k}={saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differ[:5])
                              + "); pass the same flags, or leave out --resume to start afresh")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    gen.set_state(state["rng"]["generator"])


def run_training(tc: TrainConfig, cc: ClassifierConfig, policy: RoutingPolicy | None = None,
                 ds: Dataset | None = None, save: bool = True, taught: tuple[torch.Tensor, list[str]] | None = None
                 ) -> dict:
    """The whole experiment; returns the report (also written beside the model). `taught`:
    examples users taught ((N, C, H, W) uint8, labels), added to the training split only.
    Under torchrun, every process runs this; rank 0 alone prints, checkpoints and saves."""
    world = distributed.world_size_from_env()
    if tc.batch_size < world:
        raise ValueError(f"--batch-size ({tc.batch_size}) is the global batch: it must be at least the number of "
                         f"processes ({world})")
    comm = distributed.setup(tc.device, tc.dist_timeout)  # None in one process
    try:
        return _run_training(tc, cc, RoutingPolicy() if policy is None else policy, ds, save, taught, comm)
    finally:
        distributed.shutdown(comm)


def _run_training(tc: TrainConfig, cc: ClassifierConfig, policy: RoutingPolicy, ds: Dataset | None, save: bool,
                  taught: tuple[torch.Tensor, list[str]] | None, comm: distributed.Comm | None) -> dict:
    main = comm is None or comm.is_main
    say = print if main else (lambda *args, **kwargs: None)
    torch.manual_seed(tc.seed)
    if ds is None:
        ds = load_dataset(tc.dataset, tc.data_dir, tc.download)
    if tc.exclude_classes:
        ds = keep_classes(ds, tc.exclude_classes)
    extra = None
    if taught is not None and len(taught[1]):
        ds, extra = fold_in(ds, *taught)
    train, val, val_idx = carve_validation(ds.train, tc.validation_size, tc.seed)
    if tc.limit_train is not None:
        train = subset(train, stratified_indices(train.labels, tc.limit_train, tc.seed))
    if extra is not None:
        train = Split(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]))
    test = ds.test if tc.limit_test is None else subset(ds.test, stratified_indices(ds.test.labels, tc.limit_test,
                                                                                    tc.seed))
    train_x, train_y, test_x, test_y = train.images, train.labels, test.images, test.labels
    # per-epoch curves read the validation split; without one, the training images themselves
    eval_x, eval_y = (val.images, val.labels) if len(val.labels) else (train_x, train_y)
    mean, std = ds.normalization()
    pad = tc.augment_pad if tc.augment_pad is not None else (0 if ds.image_size <= 28 else 4)
    bf16 = tc.use_bf16()

    fewest = int(torch.bincount(train_y, minlength=len(ds.classes)).min())
    if cc.replay_per_class > fewest:  # the replay is the same size for every class
        print(f"replay_per_class {cc.replay_per_class} -> {fewest}: the rarest class has {fewest} training images")
        cc.replay_per_class = fewest
    model = place(build_model(tc, cc, ds).to(memory_format=torch.channels_last), tc.device)
    steps_per_epoch = math.ceil(len(train_x) / tc.batch_size)
    opt, sched = make_optimizer(model, tc, tc.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(tc.seed)
    fingerprint = settings_fingerprint(tc, cc, policy, len(train_x))
    world = 1 if comm is None else comm.world_size
    history: list[dict] = []
    memory_sync: list[dict] = []  # per epoch, every process's memory sha256 (across processes)
    say(f"training {tc.name}: {ds.name} ({len(train_x)} train / {len(val.labels)} validation / {len(test_x)} test, "
        f"{len(ds.classes)} classes), "
        f"backbone {cc.backbone} (memory reads {cc.exit_stage}), memory {cc.memory} ({cc.memory_size}), "
        f"{tc.epochs} epochs, "
        f"batch {tc.batch_size}, {'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} threads"
        + ("" if comm is None else
           f" per process, {world} processes ({distributed.backend_for(tc.device)}) on {tc.device}"),
        flush=True)

    start = 1
    found = load_checkpoint(tc.checkpoint_dir) if tc.resume else None
    if tc.resume and found is None:
        say(f"--resume: no checkpoint in {tc.checkpoint_dir}; starting afresh", flush=True)
    if found is not None:
        done, state = found
        restore(state, fingerprint, model, opt, sched, gen, tc.checkpoint_dir)
        history, memory_sync, start = state["history"], state["memory_sync"], done + 1
        note = "" if state["world_size"] == world else \
            f" (written by {state['world_size']} processes: same data order, other batch-norm batches)"
        say(f"resuming after epoch {done} of {tc.epochs} from {tc.checkpoint_dir}{note}", flush=True)
    if comm is not None and len(set(starts := comm.values_by_rank(start))) > 1:
        raise CheckpointError(f"--resume: the processes found different checkpoints (first epoch by rank: {starts}); "
                              "--checkpoint-dir must be a folder every process reads (a shared file system)")
    ddp = distributed.wrap(model, comm, tc.device) if comm is not None else None

    for epoch in range(start, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train_x), generator=gen)
        sums = {"ce": 0.0, "mem": 0.0, "correct": 0.0, "n": 0}
        if comm is not None:
            comm.reset_timings()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{tc.epochs}", disable=not (tc.progress and main),
                   leave=False)
        for step in bar:
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            images, labels = augment(train_x[idx], pad, tc.flip, gen), train_y[idx]  # the global batch
            if comm is not None:
                mine = comm.share(len(idx))
                images, labels = images[mine], labels[mine]
            x = normalize(images, mean, std).to(tc.device).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
            ce, mem, correct = train_step(model, opt, x, labels.to(tc.device), tc.memory_loss_weight,
                                          tc.label_smoothing, bf16, ddp=ddp, comm=comm, write_rows=len(idx))
            sched.step()
            sums["ce"] += ce * len(labels)
            sums["mem"] += mem * len(labels)
            sums["correct"] += correct
            sums["n"] += len(labels)
            bar.set_postfix(ce=f"{ce:.3f}", mem=f"{mem:.3f}")
        train_time = time.perf_counter() - t0
        if comm is not None:
            sums = dict(zip(sums, comm.sum(list(sums.values()))))  # every process's share (pads included)
            comm.broadcast_buffers(model)  # rank 0's batch-norm statistics: the model rank 0 saves
        ev = evaluate(collect_predictions(model, eval_x, mean, std, policy, comm=comm), eval_y, policy,
                      cc.num_classes)
        n = sums["n"]
        row = {
            "epoch": epoch,
            "train_loss": (sums["ce"] + tc.memory_loss_weight * sums["mem"]) / n,
            "ce_loss": sums["ce"] / n,
            "memory_loss": sums["mem"] / n,
            "train_accuracy": sums["correct"] / n,
            "val_accuracy": ev.accuracy,
            "val_head_accuracy": ev.head_accuracy,
            "memory_usage": ev.memory_usage,
            "memory_path_accuracy": ev.memory_path_accuracy,
            "memory_fill": (model.memory.size / model.memory.capacity) if model.memory is not None else 0.0,
            "epoch_seconds": train_time,
        }
        if comm is not None:  # rank 0's time in the memory's collectives (waiting for the others included)
            row["memory_gather_ms_per_step"] = 1e3 * comm.timings["gather"] / steps_per_epoch
            row["memory_grads_ms_per_step"] = 1e3 * comm.timings["memory_grads"] / steps_per_epoch
        history.append(row)
        say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if comm is not None and tc.check_memory_sync and model.memory is not None:
            digests = comm.check_same_memory(model.memory)  # MemoryDiverged, on every process, if they differ
            memory_sync.append({"epoch": epoch, "sha256_by_rank": digests})
            say(f"memory identical on {world} processes after epoch {epoch} (sha256 {digests[0][:16]})", flush=True)
        if tc.checkpoint_dir and main:
            save_checkpoint(tc.checkpoint_dir, epoch, {
                "fingerprint": fingerprint, "world_size": world, "history": history, "memory_sync": memory_sync,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state()}})

    sweep = threshold_sweep(collect_predictions(model, eval_x, mean, std, policy, comm=comm), eval_y, policy,
                            cc.num_classes)
    if tc.choose_threshold:
        policy = policy.replace(confidence_threshold=choose_threshold(sweep))
        say(f"confidence threshold {policy.confidence_threshold} chosen on the validation split "
            f"({len(val.labels)} images)", flush=True)
    model.policy = policy
    test = evaluate(collect_predictions(model, test_x, mean, std, policy, comm=comm), test_y, policy, cc.num_classes)
    say(f"test (reported only): accuracy {test.accuracy:.4f} head {test.head_accuracy:.4f} "
        f"memory usage {test.memory_usage:.4f} memory-path accuracy {test.memory_path_accuracy:.4f}", flush=True)
    model = place(model, "cpu")  # the service's device: inference is timed and saved from here
    fill_replay(model, train_x, train_y, mean, std, tc.seed)  # the same on every rank
    speed = evaluate_inference_speed(model, test_x, mean, std) if main else {}
    final = history[-1]
    split = {"dataset": ds.name, "exclude_classes": list(tc.exclude_classes), "validation_size": len(val.labels),
             "validation_seed": tc.seed, "validation_indices_sha256": sha256_bytes(val_idx.numpy().tobytes()),
             "train_size": len(train_y), "test_size": len(test_y),
             "taught_examples": 0 if extra is None else len(extra.labels),
             "threshold_chosen_on": "validation" if tc.choose_threshold else "given (--confidence-threshold)"}
    report = {
        "train_config": asdict(tc),
        "classifier": cc.to_dict(),
        "routing": policy.to_dict(),
        "data": split,
        "dataset": ds.name,
        "classes": ds.classes,
        "final": {"test_accuracy": test.accuracy, "test_head_accuracy": test.head_accuracy,
                  "memory_usage": test.memory_usage, "memory_path_accuracy": test.memory_path_accuracy,
                  "val_accuracy": final["val_accuracy"], "memory_fill": final["memory_fill"],
                  "train_accuracy": final["train_accuracy"]},
        "history": history,
        "threshold_sweep": sweep,
        "inference_speed": speed,
        "torch_threads": torch.get_num_threads(),
    }
    if comm is not None:
        report["distributed"] = {"world_size": world, "backend": distributed.backend_for(tc.device),
                                 "memory_sync": memory_sync}
    if start > 1:
        report["resumed_after_epoch"] = start - 1
    say("inference speed:", json.dumps(speed), flush=True)
    if save and main:
        fig, sweep_fig = _plot_training(history, sweep)
        reports = {"metrics.json": json.dumps(report, indent=2).encode(), "metrics.csv": _csv(history),
                   "threshold_sweep.json": json.dumps(sweep, indent=2).encode(), "training.png": fig,
                   "threshold_sweep.png": sweep_fig}
        model = model.to(memory_format=torch.contiguous_format)
        d = save_model(tc.store, tc.name, model, ds.classes, InputSpec(ds.image_size, ds.in_chans, mean, std),
                       metrics=report["final"], reports=reports, splits=split)
        say(f"saved {d}", flush=True)
    if comm is not None:
        comm.barrier()  # the others wait for rank 0's save; a failure there ends the run for all (torchrun)
    report["model"] = model
    return report
