"""Training recipes by name: the optimiser, schedule, augmentation and tricks a run uses.

    onecycle  one-cycle Nesterov SGD at batch 128, random flips and translation: the recipe
              of the small residual CNNs (small_resnet, small_resnet_wide, timm models)
    airbench  airbench94's recipe (Keller Jordan, github.com/KellerJordan/cifar10-airbench) for
              the network with its layout, poolnet:
                - first convolution frozen at the whitening of the training images' patches
                  (its bias learnt for the first `whiten_bias_epochs`, then frozen)
                - convolutions start as identities (dirac), batch norm without a learnt scale
                  (backbones.py: poolnet's architecture)
                - Nesterov SGD, momentum 0.85, batch 1024; the learning rate and weight decay
                  per example (decoupled: airbench's parametrisation), batch-norm biases at 64x
                  the learning rate; the head at 1/9 of its output scale (as lr/81, init/9)
                - 23% linear warm-up from 0.2x, then a linear decay to 0.07x
                - label smoothing 0.2
                - lookahead: every 5 steps the weights move to an average of their past values,
                  which tightens towards the end (`Lookahead`, optimisation.py)
                - alternating flips: each image's flip is drawn once and reversed every other
                  epoch (every epoch sees the other side of the previous one); 2-pixel
                  translation with reflected borders

`TrainConfig` fields left unset (None) take the recipe's value (`TrainConfig.resolved`);
`python -m service train --recipe auto` (the default) picks airbench for poolnet, onecycle else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of a mean loss at `batch_size` (scales with the batch: lr_per_example)
    weight_decay: float  # PyTorch SGD's weight_decay at that learning rate
    label_smoothing: float
    translate: int | None  # pixels; None: 0 for 28 px images, 4 for larger
    reflect: bool = False  # translation fills the border with the reflected image (else zeros)
    alternate_flip: bool = False
    schedule: str = "onecycle"  # or "warmup_linear"
    momentum: float = 0.9
    bias_lr_scale: float = 1.0  # batch-norm biases' learning rate, times lr (weight decay per step unchanged)
    head_scale: float = 1.0  # the head trained as if its output were multiplied by this
    lookahead: bool = False
    whiten: bool = False  # the backbone's first convolution whitened (backbones that have one)
    whiten_bias_epochs: int = 0
    lr_per_example: bool = False  # lr given at `batch_size`, scaled linearly when --batch-size differs


_AIRBENCH_MOMENTUM = 0.85
# airbench94: lr 11.5 and weight decay 0.0153 per 1024 examples, decoupled from the momentum's
# step growth (1 + 1/(1 - momentum)); as the learning rate of a mean loss at batch 1024, and
# the weight decay whose per-step shrink lr * wd is airbench's
_KILOSTEP = 1024 * (1 + 1 / (1 - _AIRBENCH_MOMENTUM))
_AIRBENCH_LR = 11.5 / _KILOSTEP * 1024  # 1.5
_AIRBENCH_WD = 0.0153 / 11.5

RECIPES = {
    "onecycle": Recipe("onecycle", epochs=5, batch_size=128, lr=0.1, weight_decay=5e-4, label_smoothing=0.0,
                       translate=None),
    "airbench": Recipe("airbench", epochs=10, batch_size=1024, lr=_AIRBENCH_LR, weight_decay=_AIRBENCH_WD,
                       label_smoothing=0.2, translate=2, reflect=True, alternate_flip=True,
                       schedule="warmup_linear", momentum=_AIRBENCH_MOMENTUM, bias_lr_scale=64.0, head_scale=1 / 9,
                       lookahead=True, whiten=True, whiten_bias_epochs=3, lr_per_example=True),
}


def recipe_for(name: str, backbone: str) -> Recipe:
    """The recipe called `name`; "auto": airbench for poolnet, onecycle for every other backbone."""
    if name == "auto":
        name = "airbench" if backbone == "poolnet" else "onecycle"
    if name not in RECIPES:
        raise ValueError(f"--recipe must be auto or one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]
