"""The training experiment, as named steps; `_run_training` reads them top to bottom:

    data      prepare_data             the splits: train / validation (seeded, class-stratified,
                                       carved out of the training set) / test
    model     classifier_for           the classifier, its config completed from the data set
    loop      train_epoch, train_step  one-cycle SGD; each step writes the batch into the memory, all
                                       on the training device (no step waits for it: train_steps)
              evaluate_epoch           per-epoch curves on the validation split
              write_checkpoint         with --checkpoint-dir, the state at each epoch's end
    tta       choose_tta               flip test-time augmentation, kept if it pays on the validation split
    threshold choose_routing_threshold the confidence threshold, chosen on the validation split
    online    choose_online            how feedback teaches new classes, chosen on pseudo-new classes of
                                       the validation split (online_choice.py)
    test      evaluate_on_test         once, at the end, with the chosen policy: it only reports
    save      training_report, save_trained

    loss = cross_entropy(head(features), y) + memory_loss_weight * memory.contrastive_loss(features, y)
    after each step: memory.update(features, y)

Launched by `torchrun --nproc_per_node N -m service train ...` it trains data-parallel, with one
memory kept identical on every process (distributed.py). With --checkpoint-dir, the state at
the end of every epoch is written (checkpoint.py) and --resume continues from it. Evaluation is
in evaluation.py, the plots and CSV in training_reports.py, the replay features in retrofit.py.

Longer than ~350 lines on purpose: the experiment's steps in the order they run, read in one
place; the config (train_config.py) and one step's arithmetic (optimisation.py) are apart.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from .data import (Dataset, Split, augment, carve_validation, fold_in, keep_classes, load_dataset, normalize,
                   stratified_indices, subset)
from .evaluation import (SWEEP_THRESHOLDS, EvalResult, choose_threshold, collect_predictions, evaluate,
                         evaluate_inference_speed, threshold_sweep)
from .model import ClassifierConfig, EnhancedClassifier
from .online_choice import choose_on_images
from .optimisation import Lookahead, make_optimizer, set_epoch, start_recipe, train_step
from .retrofit import calibrate_novelty, fill_replay
from .routing import RoutingPolicy
from .store import InputSpec, save_model, sha256_bytes
from .train_config import TrainConfig, run_only_settings
from .training_reports import history_csv, plot_training


# ClassifierConfig fields training takes from the data set (classifier_for), so no flags of their own
FROM_DATASET = ("num_classes", "in_chans", "image_size", "memory_classes")
WHITENING_IMAGES = 5000  # training images whose patches whiten the first convolution (airbench's count)


# --- the experiment ---------------------------------------------------------------------------
def run_training(tc: TrainConfig, cc: ClassifierConfig, policy: RoutingPolicy | None = None,
                 ds: Dataset | None = None, save: bool = True, taught: tuple[torch.Tensor, list[str]] | None = None
                 ) -> dict:
    """The whole experiment; returns the report (metrics.json, plus "model_dir" where it was
    saved). `taught`: examples users taught ((N, C, H, W) uint8, labels), added to the training
    split only. Under torchrun, every process runs this; rank 0 alone prints, checkpoints and saves."""
    tc = tc.resolved(cc.backbone)  # the recipe's settings filled in: what the run uses and records
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
    torch.manual_seed(tc.seed)  # the model's initial weights (data order and augmentation: `gen`)
    data = prepare_data(tc, ds, taught)
    run = Run(tc, data, comm, pad=tc.translation_for(data.dataset.image_size), bf16=tc.use_bf16(),
              steps_per_epoch=math.ceil(len(data.train.labels) / tc.batch_size),
              images=data.train.images.to(tc.device), labels=data.train.labels.to(tc.device),
              flips=alternating_flips(tc, len(data.train.labels)))

    cc = replay_within_rarest_class(classifier_for(cc, data.dataset, tc.extra_memory_classes), data.train)
    model = EnhancedClassifier(cc).to(tc.device, memory_format=torch.channels_last)  # the memory too
    whitening = data.train.images[whitening_sample(len(data.train.labels), tc.seed)]
    start_recipe(model, tc, normalize(whitening, data.mean, data.std))
    opt, sched = make_optimizer(model, tc, tc.epochs * run.steps_per_epoch)
    lookahead = Lookahead(model, tc.epochs * run.steps_per_epoch) if tc.recipe_settings.lookahead else None
    # data order and augmentation, alike on every process; on the data's device, so that
    # drawing a batch never leaves it (a CUDA generator draws another stream than the CPU's)
    gen = torch.Generator(device=tc.device).manual_seed(tc.seed)
    fingerprint = settings_fingerprint(tc, cc, policy, len(data.train.labels))
    run.say(describe(run, cc), flush=True)

    progress = resume_or_start(run, fingerprint, model, opt, sched, gen, lookahead)
    ddp = distributed.wrap(model, comm, tc.device) if comm is not None else None
    for epoch in range(progress.next_epoch, tc.epochs + 1):
        set_epoch(model, tc, epoch)
        sums, seconds = train_epoch(run, model, opt, sched, gen, ddp, epoch, lookahead)
        progress.history.append(evaluate_epoch(run, model, policy, epoch, sums, seconds))
        if (digests := check_memory_sync(run, model, epoch)) is not None:
            progress.memory_sync.append(digests)
        write_checkpoint(run, epoch, fingerprint, progress, model, opt, sched, gen, lookahead)

    tta = choose_tta(run, model, policy)
    sweep, policy = choose_routing_threshold(run, model, policy)
    model.policy = policy  # the test is evaluated with it, the model saved with it
    test = evaluate_on_test(run, model)
    model = model.to("cpu")  # the service's device: inference is timed and saved from here
    fill_replay(model, data.train.images, data.train.labels, data.mean, data.std, tc.seed)  # alike on every rank
    # "none of these": the ood_score's Gaussians on the memory, the abstain threshold on validation
    model.policy = policy = policy.replace(ood_threshold=calibrate_novelty(
        model, data.validation.images, data.mean, data.std, tc.novelty_shrink, (data.train.images, data.train.labels),
        tc.novelty_probe_weight, tc.seed))
    model.policy = policy = choose_online(run, model, policy, online := {})
    speed = evaluate_inference_speed(model, data.test.images, data.mean, data.std) if run.main else {}
    report = training_report(run, model, progress, sweep, test, speed) | {"tta_choice": tta, "online_choice": online}
    run.say("inference speed:", json.dumps(speed), flush=True)
    saved = save_trained(run, model, report) if save and run.main else None
    if comm is not None:
        comm.barrier()  # the others wait for rank 0's save; a failure there ends the run for all (torchrun)
    return report if saved is None else report | {"model_dir": str(saved)}


def describe(run: Run, cc: ClassifierConfig) -> str:
    tc, data, ds = run.tc, run.data, run.data.dataset
    return (f"training {tc.name}: {ds.name} ({len(data.train.labels)} train / {len(data.validation.labels)} validation "
            f"/ {len(data.test.labels)} test, {len(ds.classes)} classes), "
            f"backbone {cc.backbone} (memory reads {cc.exit_stage}), memory {cc.memory} ({cc.memory_size}), "
            f"{tc.epochs} epochs, batch {tc.batch_size}, {'bf16' if run.bf16 else 'fp32'}, "
            f"{torch.get_num_threads()} threads"
            + ("" if run.comm is None else
               f" per process, {run.world} processes ({distributed.backend_for(tc.device)}) on {tc.device}"))


# --- data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingData:
    """What one run reads: uint8 images (N, C, H, W) with int64 labels (N,) per split."""
    dataset: Dataset  # classes (taught ones appended), name, image shape
    train: Split  # learnt from: --limit-train applied, then the taught examples appended
    validation: Split  # chooses the threshold, draws the curves (empty with --validation-size 0)
    test: Split  # reported once, at the end (--limit-test applied)
    validation_indices: torch.Tensor  # (V,) the validation images' positions in the data set's training split
    taught_examples: int
    mean: list[float]  # per channel, what `normalize` subtracts
    std: list[float]

    @property
    def curves(self) -> Split:
        """What the per-epoch curves and the threshold read: the validation split; without one, the training images."""
        return self.validation if len(self.validation.labels) else self.train


def prepare_data(tc: TrainConfig, ds: Dataset | None, taught: tuple[torch.Tensor, list[str]] | None) -> TrainingData:
    if ds is None:
        ds = load_dataset(tc.dataset, tc.data_dir, tc.download)
    if tc.exclude_classes:
        ds = keep_classes(ds, list(tc.exclude_classes))
    extra = None
    if taught is not None and len(taught[1]):
        ds, extra = fold_in(ds, *taught)  # new class names appended to ds.classes
    train, val, val_idx = carve_validation(ds.train, tc.validation_size, tc.seed)
    if tc.limit_train is not None:
        train = subset(train, stratified_indices(train.labels, tc.limit_train, tc.seed))
    if extra is not None:
        train = Split(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]))
    test = ds.test if tc.limit_test is None else subset(ds.test, stratified_indices(ds.test.labels, tc.limit_test,
                                                                                    tc.seed))
    mean, std = ds.normalization()
    return TrainingData(ds, train, val, test, val_idx, 0 if extra is None else len(extra.labels), mean, std)


# --- model ------------------------------------------------------------------------------------
def classifier_for(cc: ClassifierConfig, ds: Dataset, extra_memory_classes: int) -> ClassifierConfig:
    """`cc` completed from the data set (FROM_DATASET): its classes and image shape, and a
    memory label space with room for `extra_memory_classes` taught later."""
    return replace(cc, num_classes=len(ds.classes), in_chans=ds.in_chans, image_size=ds.image_size,
                   memory_classes=len(ds.classes) + extra_memory_classes)


def whitening_sample(n: int, seed: int) -> torch.Tensor:
    """Indices of the WHITENING_IMAGES training images the first convolution is whitened on: a
    seeded draw, not the first ones, because a data set stored class by class (the CIFAR-10 JPEG
    zip) would give the whitening mostly one class's patches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:WHITENING_IMAGES]


def alternating_flips(tc: TrainConfig, n: int) -> torch.Tensor | None:
    """Each training image's side in odd epochs, drawn once from the seed (a --resume draws
    the same); None unless the recipe alternates flips."""
    if not (tc.flip and tc.recipe_settings.alternate_flip):
        return None
    return (torch.rand(n, generator=torch.Generator().manual_seed(tc.seed + 1)) < 0.5).to(tc.device)


def replay_within_rarest_class(cc: ClassifierConfig, train: Split) -> ClassifierConfig:
    """The replay keeps as many images of every class: at most the rarest class's count."""
    fewest = int(torch.bincount(train.labels, minlength=cc.num_classes).min())
    if cc.replay_per_class <= fewest:
        return cc
    print(f"replay_per_class {cc.replay_per_class} -> {fewest}: the rarest class has {fewest} training images")
    return replace(cc, replay_per_class=fewest)


# --- the loop ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """The fixed parts of one run, which every step reads."""
    tc: TrainConfig
    data: TrainingData
    comm: distributed.Comm | None  # None in one process
    pad: int  # the augmentation's translation, pixels
    bf16: bool
    steps_per_epoch: int
    images: torch.Tensor  # (N, C, H, W) uint8: the training split on the training device, drawn from by index
    labels: torch.Tensor  # (N,) int64, there too
    flips: torch.Tensor | None = None  # (N,) bool, there too: each image's side in odd epochs (alternating flips)

    @property
    def main(self) -> bool:
        return self.comm is None or self.comm.is_main

    @property
    def world(self) -> int:
        return 1 if self.comm is None else self.comm.world_size

    def say(self, *args, **kwargs) -> None:
        """print, on the main process only."""
        if self.main:
            print(*args, **kwargs)


@dataclass
class Progress:
    """What the finished epochs produced, carried across a --resume."""
    next_epoch: int = 1
    history: list[dict] = field(default_factory=list)  # a row per epoch (evaluate_epoch)
    memory_sync: list[dict] = field(default_factory=list)  # per epoch, every process's memory sha256


def train_epoch(run: Run, model: EnhancedClassifier, opt, sched, gen: torch.Generator,
                ddp: torch.nn.Module | None, epoch: int, lookahead: Lookahead | None = None) -> tuple[dict, float]:
    """One pass over the training split in the shared generator's order: (sums of the steps'
    cross-entropy, memory loss, correct answers and images, over every process; seconds).
    The steps run in `train_steps`; their sums are read here, once."""
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(run.labels), generator=gen, device=gen.device)  # (N,) the same on every process
    if run.comm is not None:
        run.comm.reset_timings()
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch}/{run.tc.epochs}",
               disable=not (run.tc.progress and run.main), leave=False)
    totals, n = train_steps(run, model, opt, sched, gen, ddp, perm, bar, epoch, lookahead)
    sums = dict(zip(("ce", "mem", "correct"), totals.tolist())) | {"n": n}  # the epoch's one read from the device
    seconds = time.perf_counter() - t0  # the read above waited for the device's last step
    if run.comm is not None:
        sums = dict(zip(sums, run.comm.sum(list(sums.values()))))  # every process's share (pads included)
        run.comm.broadcast_buffers(model)  # rank 0's batch-norm statistics: the model rank 0 saves
    return sums, seconds


def train_steps(run: Run, model: EnhancedClassifier, opt, sched, gen: torch.Generator | None,
                ddp: torch.nn.Module | None, perm: torch.Tensor, steps, epoch: int = 1,
                lookahead: Lookahead | None = None) -> tuple[torch.Tensor, int]:
    """The epoch's steps over the batches of `perm` ((N,) on the training device), numbered by
    `steps`: (sums of cross-entropy, memory loss and correct answers, (3,) float64 on the
    device; images, this process's).

    Everything a step touches stays on the training device: the split (one uint8 tensor,
    batches drawn by index), the augmentation (one batched gather), the memory; the step's
    figures are summed there. Nothing here reads a value back from the device, so a GPU
    never waits for the host between steps."""
    tc, comm, N = run.tc, run.comm, len(perm)
    dev = run.images.device
    totals = torch.zeros(3, dtype=torch.float64, device=dev)  # ce, memory loss, correct
    mean, std = torch.tensor(run.data.mean, device=dev), torch.tensor(run.data.std, device=dev)  # (C,) once
    n = 0  # images, counted on the host
    recipe = tc.recipe_settings
    for step in steps:
        idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]  # (B,)
        # alternating flips: each image's drawn side, reversed every other epoch
        flips = run.flips[idx] ^ (epoch % 2 == 0) if run.flips is not None else None  # (B,) bool
        images = augment(run.images[idx], run.pad, tc.flip, gen, flips=flips, reflect=recipe.reflect)
        labels = run.labels[idx]  # the global batch
        B = min(tc.batch_size, N - step * tc.batch_size)
        if comm is not None:
            mine = comm.share(B, device=idx.device)
            images, labels = images[mine], labels[mine]  # this process's share: B / W of them
        x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)  # (b, C, H, W)
        ce, mem, correct = train_step(model, opt, x, labels, tc.memory_loss_weight, tc.label_smoothing, run.bf16,
                                      ddp=ddp, comm=comm, write_rows=B)
        sched.step()
        if lookahead is not None:
            lookahead.after_step((epoch - 1) * run.steps_per_epoch + step + 1)
        b = labels.shape[0]
        totals += torch.stack([ce.double() * b, mem.double() * b, correct.double()])
        n += b
    return totals, n


def evaluate_epoch(run: Run, model: EnhancedClassifier, policy: RoutingPolicy, epoch: int, sums: dict,
                   seconds: float) -> dict:
    """The epoch's row of the history: training sums as means, routed accuracy on the validation split."""
    curves = run.data.curves
    ev = evaluate(collect_predictions(model, curves.images, run.data.mean, run.data.std, policy, comm=run.comm),
                  curves.labels, policy, model.config.num_classes)
    n = sums["n"]
    row = {
        "epoch": epoch,
        "train_loss": (sums["ce"] + run.tc.memory_loss_weight * sums["mem"]) / n,
        "ce_loss": sums["ce"] / n,
        "memory_loss": sums["mem"] / n,
        "train_accuracy": sums["correct"] / n,
        "val_accuracy": ev.accuracy,
        "val_head_accuracy": ev.head_accuracy,
        "memory_usage": ev.memory_usage,
        "memory_path_accuracy": ev.memory_path_accuracy,
        "memory_fill": (model.memory.size / model.memory.capacity) if model.memory is not None else 0.0,
        "epoch_seconds": seconds,
    }
    if run.comm is not None:  # rank 0's time in the memory's collectives (waiting for the others included)
        row["memory_gather_ms_per_step"] = 1e3 * run.comm.timings["gather"] / run.steps_per_epoch
        row["memory_grads_ms_per_step"] = 1e3 * run.comm.timings["memory_grads"] / run.steps_per_epoch
    run.say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def check_memory_sync(run: Run, model: EnhancedClassifier, epoch: int) -> dict | None:
    """Across processes: every process's memory sha256 (MemoryDiverged, on every process, if they differ)."""
    if run.comm is None or not run.tc.check_memory_sync or model.memory is None:
        return None
    digests = run.comm.check_same_memory(model.memory)
    run.say(f"memory identical on {run.world} processes after epoch {epoch} (sha256 {digests[0][:16]})", flush=True)
    return {"epoch": epoch, "sha256_by_rank": digests}


# --- checkpoints ------------------------------------------------------------------------------
def settings_fingerprint(tc: TrainConfig, cc: ClassifierConfig, policy: RoutingPolicy, train_size: int) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint, flat and
    as JSON gives them back."""
    fp = {k: v for k, v in asdict(tc).items() if k not in run_only_settings()}
    fp |= {f"classifier.{k}": v for k, v in cc.to_dict().items()}
    fp |= {f"routing.{k}": v for k, v in policy.to_dict().items()}
    fp["train_size"] = train_size
    return json.loads(json.dumps(fp))


def resume_or_start(run: Run, fingerprint: dict, model: EnhancedClassifier, opt, sched,
                    gen: torch.Generator, lookahead: Lookahead | None = None) -> Progress:
    """With --resume, the state after the checkpoint's epoch; else (or with none found) epoch 1."""
    tc = run.tc
    found = load_checkpoint(tc.checkpoint_dir) if tc.resume else None
    progress = Progress()
    if tc.resume and found is None:
        run.say(f"--resume: no checkpoint in {tc.checkpoint_dir}; starting afresh", flush=True)
    if found is not None:
        done, state = found
        restore_checkpoint(state, fingerprint, model, opt, sched, gen, tc.checkpoint_dir)
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        progress = Progress(done + 1, state["history"], state["memory_sync"])
        note = "" if state["world_size"] == run.world else \
            f" (written by {state['world_size']} processes: same data order, other batch-norm batches)"
        run.say(f"resuming after epoch {done} of {tc.epochs} from {tc.checkpoint_dir}{note}", flush=True)
    if run.comm is not None and len(set(starts := run.comm.values_by_rank(progress.next_epoch))) > 1:
        raise CheckpointError(f"--resume: the processes found different checkpoints (first epoch by rank: {starts}); "
                              "--checkpoint-dir must be a folder every process reads (a shared file system)")
    return progress


def write_checkpoint(run: Run, epoch: int, fingerprint: dict, progress: Progress, model: EnhancedClassifier, opt,
                     sched, gen: torch.Generator, lookahead: Lookahead | None = None) -> None:
    if run.tc.checkpoint_dir and run.main:
        save_checkpoint(run.tc.checkpoint_dir, epoch, {
            "fingerprint": fingerprint, "world_size": run.world, "history": progress.history,
            "memory_sync": progress.memory_sync, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state(),
                                                   "generator_device": gen.device.type},
            "lookahead": None if lookahead is None else lookahead.state_dict()})


# --- test-time augmentation, threshold, test, report, save ------------------------------------------
TTA_MIN_GAIN = 0.003  # flip TTA doubles every image's network cost: kept for 0.3 point or more


def choose_tta(run: Run, model: EnhancedClassifier, policy: RoutingPolicy) -> dict:
    """With --choose-tta (and flips in training, the memory on the final features): routed
    validation accuracy without and with flip TTA; flip is kept (model.config.tta) only if it
    adds TTA_MIN_GAIN. Returns both accuracies and the choice, for the report."""
    cc = model.config
    if not (run.tc.choose_tta and run.tc.flip and cc.exit_stage == "final" and len(run.data.validation.labels)):
        return {"chosen": cc.tta, "chosen_on": "given (--tta)"}
    accuracy = {}
    for tta in ("none", "flip"):
        cc.tta = tta
        preds = collect_predictions(model, run.data.validation.images, run.data.mean, run.data.std, policy,
                                    comm=run.comm)
        accuracy[tta] = evaluate(preds, run.data.validation.labels, policy, cc.num_classes).accuracy
    cc.tta = "flip" if accuracy["flip"] - accuracy["none"] >= TTA_MIN_GAIN else "none"
    run.say(f"test-time augmentation: validation accuracy {accuracy['none']:.4f} without, {accuracy['flip']:.4f} "
            f"with flip: {cc.tta} chosen", flush=True)
    return {"chosen": cc.tta, "chosen_on": "validation", "validation_accuracy": accuracy, "min_gain": TTA_MIN_GAIN}


def choose_routing_threshold(run: Run, model: EnhancedClassifier, policy: RoutingPolicy
                             ) -> tuple[list[dict], RoutingPolicy]:
    """(the threshold sweep on the validation split, the policy: with --choose-threshold its most accurate threshold)."""
    curves = run.data.curves
    preds = collect_predictions(model, curves.images, run.data.mean, run.data.std, policy, comm=run.comm)
    sweep = threshold_sweep(preds, curves.labels, policy, model.config.num_classes, SWEEP_THRESHOLDS)
    if not run.tc.choose_threshold:
        return sweep, policy
    policy = policy.replace(confidence_threshold=choose_threshold(sweep))
    run.say(f"confidence threshold {policy.confidence_threshold} chosen on the validation split "
            f"({len(run.data.validation.labels)} images)", flush=True)
    return sweep, policy


def choose_online(run: Run, model: EnhancedClassifier, policy: RoutingPolicy, report: dict) -> RoutingPolicy:
    """With --choose-online: the online-learning settings chosen on pseudo-new classes of the
    validation split (online_choice.py); `report` gets what was tried."""
    if not run.tc.choose_online:
        report.update(chosen_on="given (--no-choose-online)")
        return policy
    val = run.data.validation
    chosen, found = choose_on_images(model, val.images, val.labels, run.data.mean, run.data.std, policy, run.tc.seed)
    report.update(found)
    if "table" in found:
        run.say(f"online learning: {json.dumps(found['chosen'])} chosen on the validation split (pseudo-new classes: "
                f"old classes {-100 * found['old_drop']:+.2f} points, mean(old, new) {found['mean_old_new']:.4f}, "
                f"{found['seconds']:.0f} s)", flush=True)
    return chosen


def evaluate_on_test(run: Run, model: EnhancedClassifier) -> EvalResult:
    test = run.data.test
    preds = collect_predictions(model, test.images, run.data.mean, run.data.std, model.policy, comm=run.comm)
    ev = evaluate(preds, test.labels, model.policy, model.config.num_classes)
    run.say(f"test (reported only): accuracy {ev.accuracy:.4f} head {ev.head_accuracy:.4f} "
            f"memory usage {ev.memory_usage:.4f} memory-path accuracy {ev.memory_path_accuracy:.4f}", flush=True)
    return ev


def training_report(run: Run, model: EnhancedClassifier, progress: Progress, sweep: list[dict], test: EvalResult,
                    speed: dict) -> dict:
    """metrics.json: the settings, the splits, the final figures, the curves, the sweep."""
    tc, data, final = run.tc, run.data, progress.history[-1]
    split = {"dataset": data.dataset.name, "exclude_classes": list(tc.exclude_classes),
             "validation_size": len(data.validation.labels), "validation_seed": tc.seed,
             "validation_indices_sha256": sha256_bytes(data.validation_indices.numpy().tobytes()),
             "train_size": len(data.train.labels), "test_size": len(data.test.labels),
             "taught_examples": data.taught_examples,
             "threshold_chosen_on": "validation" if tc.choose_threshold else "given (--confidence-threshold)"}
    report = {
        "train_config": asdict(tc),
        "classifier": model.config.to_dict(),
        "routing": model.policy.to_dict(),
        "data": split,
        "dataset": data.dataset.name,
        "classes": data.dataset.classes,
        "final": {"test_accuracy": test.accuracy, "test_head_accuracy": test.head_accuracy,
                  "memory_usage": test.memory_usage, "memory_path_accuracy": test.memory_path_accuracy,
                  "val_accuracy": final["val_accuracy"], "memory_fill": final["memory_fill"],
                  "train_accuracy": final["train_accuracy"]},
        "history": progress.history,
        "threshold_sweep": sweep,
        "inference_speed": speed,
        "torch_threads": torch.get_num_threads(),
    }
    if run.comm is not None:
        report["distributed"] = {"world_size": run.world, "backend": distributed.backend_for(tc.device),
                                 "memory_sync": progress.memory_sync}
    if progress.next_epoch > 1:
        report["resumed_after_epoch"] = progress.next_epoch - 1
    return report


def save_trained(run: Run, model: EnhancedClassifier, report: dict) -> Path:
    """The model and its reports into the store (the main process only); returns the model's folder."""
    data = run.data
    fig, sweep_fig = plot_training(report["history"], report["threshold_sweep"])
    reports = {"metrics.json": json.dumps(report, indent=2).encode(), "metrics.csv": history_csv(report["history"]),
               "threshold_sweep.json": json.dumps(report["threshold_sweep"], indent=2).encode(),
               "training.png": fig, "threshold_sweep.png": sweep_fig}
    model = model.to(memory_format=torch.contiguous_format)
    d = save_model(run.tc.store, run.tc.name, model, data.dataset.classes,
                   InputSpec(data.dataset.image_size, data.dataset.in_chans, data.mean, data.std),
                   metrics=report["final"], reports=reports, splits=report["data"])
    run.say(f"saved {d}", flush=True)
    return d

