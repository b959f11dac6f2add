"""TrainConfig: the settings of a training run, one `python -m service train` flag per field
(service/cli.py generates them; each field's docstring is its --help). Immutable: what a run
derives from it (the augmentation's translation, the precision) comes from its methods, and
the classifier's settings that the data set decides are completed in train.py with
dataclasses.replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from .recipes import Recipe, recipe_for

# marks a setting of how a run is carried out (where, with what output), not of what it
# learns: it may change between an interrupted run and its --resume
RUN_ONLY = {"run_only": True}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    """Data set: fashion-mnist, cifar10 or imagefolder."""
    data_dir: str | None = field(default=None, metadata=RUN_ONLY)
    """Folder (or .zip for imagefolder/cifar10) holding the data set."""
    download: bool = field(default=False, metadata=RUN_ONLY)
    """Allow torchvision to download the data set (needs the internet)."""
    name: str = field(default="fashion-mnist", metadata=RUN_ONLY)
    """Model name: the folder written under --store."""
    store: str = field(default="model_store", metadata=RUN_ONLY)
    """Model store folder."""
    recipe: str = "auto"
    """Training recipe (service/core/recipes.py): airbench, onecycle, or auto (airbench for poolnet, onecycle else)."""
    epochs: int | None = None
    """Training epochs (default: the recipe's)."""
    batch_size: int | None = None
    """Training batch size (default: the recipe's)."""
    lr: float | None = None
    """Peak learning rate of a mean loss (default: the recipe's; airbench's scales with --batch-size)."""
    weight_decay: float | None = None
    """SGD weight decay (not applied to memory parameters; default: the recipe's)."""
    memory_loss_weight: float = 0.4
    """Weight of the contrastive memory loss added to cross-entropy."""
    label_smoothing: float | None = None
    """Label smoothing of the cross-entropy (default: the recipe's)."""
    augment_pad: int | None = None
    """Random translation in pixels (default: the recipe's; onecycle: 0 for 28 px images, 4 for larger)."""
    flip: bool = True
    """Random horizontal flips in training."""
    exclude_classes: tuple[str, ...] = ()
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
    choose_tta: bool = True
    """Try --tta flip on the validation split; keep it only if it adds >= TTA_MIN_GAIN points (it doubles the network's cost). Off: keep --tta."""
    choose_online: bool = True
    """Choose how feedback teaches new classes (the routing policy's taught_bias, taught_l2, new_class_threshold) on the validation split (core/online_choice.py); off: keep the flags."""
    novelty_shrink: float = 0.01
    """Covariance shrinkage of the ood_score's Gaussians (bench/experiments/ood.py chose it on validation data)."""
    novelty_probe_weight: float = 0.25
    """Weight of the backbone's probe in the ood_score (core/novelty.py; 0: the memory's part alone; bench/experiments/ood.py chose it on validation data: the best mean over both data sets)."""
    limit_train: int | None = None
    """Train on a seeded, class-stratified subset of N images (quick runs and tests)."""
    limit_test: int | None = None
    """Test on a seeded, class-stratified subset of N images."""
    progress: bool = field(default=True, metadata=RUN_ONLY)
    """Show tqdm progress bars."""
    device: str = field(default="cpu", metadata=RUN_ONLY)
    """Where training runs: cpu or cuda (a GPU per process, NCCL between processes): the network, the memory, the training split and its augmentation."""
    checkpoint_dir: str | None = field(default=None, metadata=RUN_ONLY)
    """Write a checkpoint (model and memory, optimiser, schedule, RNG) here at the end of every epoch."""
    resume: bool = field(default=False, metadata=RUN_ONLY)
    """Continue from the last finished epoch of the checkpoint in --checkpoint-dir (start afresh when it holds none)."""
    check_memory_sync: bool = field(default=True, metadata=RUN_ONLY)
    """Across processes: compare a sha256 of every process's memory after each epoch; stop the run if any differs."""
    dist_timeout: float = field(default=600.0, metadata=RUN_ONLY)
    """Across processes: seconds a process waits for the others (a collective, the final save) before the run fails."""

    def __post_init__(self) -> None:
        # a list given (the command line's nargs, a caller's) is kept as a tuple: the config stays immutable
        object.__setattr__(self, "exclude_classes", tuple(self.exclude_classes))
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.novelty_shrink <= 1.0:
            raise ValueError(f"--novelty-shrink must be in [0, 1], got {self.novelty_shrink}")
        if self.novelty_probe_weight < 0:
            raise ValueError(f"--novelty-probe-weight must be >= 0, got {self.novelty_probe_weight}")
        if self.batch_size is not None and self.batch_size < 1:
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

    def resolved(self, backbone: str) -> "TrainConfig":
        """This config with every setting left to the recipe filled in from it, and the recipe
        named (auto decided by `backbone`): what a run uses and records."""
        r = recipe_for(self.recipe, backbone)
        batch = self.batch_size if self.batch_size is not None else r.batch_size
        lr = self.lr if self.lr is not None else r.lr * (batch / r.batch_size if r.lr_per_example else 1.0)
        pick = lambda given, default: default if given is None else given  # noqa: E731
        return replace(self, recipe=r.name, epochs=pick(self.epochs, r.epochs), batch_size=batch, lr=lr,
                       weight_decay=pick(self.weight_decay, r.weight_decay),
                       label_smoothing=pick(self.label_smoothing, r.label_smoothing),
                       augment_pad=pick(self.augment_pad, r.translate))

    @property
    def recipe_settings(self) -> Recipe:
        """The recipe's fixed parts (the schedule, the tricks) of a `resolved` config."""
        if self.recipe == "auto":
            raise ValueError("recipe auto: call TrainConfig.resolved(backbone) first")
        return recipe_for(self.recipe, "")

    def translation_for(self, image_size: int) -> int:
        """The augmentation's translation in pixels: --augment-pad, or 0 for 28 px images, 4 for larger."""
        if self.augment_pad is not None:
            return self.augment_pad
        return 0 if image_size <= 28 else 4

    def use_bf16(self) -> bool:
        if self.precision == "auto":
            if self.device == "cuda":
                return torch.cuda.is_bf16_supported()
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return self.precision == "bf16"



def run_only_settings() -> list[str]:
    """The fields marked RUN_ONLY: left out of a checkpoint's settings fingerprint."""
    return [f.name for f in fields(TrainConfig) if f.metadata.get("run_only")]
