"""Feature extractors by name: our small residual CNNs, or any `timm` model.

`create_backbone(name, in_chans)` returns a module mapping (B, C, H, W) images to (B, D)
features with `.num_features = D`. The built-in ones also expose `stage_list()` and `pool()`
(forward = pool after every stage), so a memory can read an earlier stage (early exit).
Names: the keys of BUILTIN, or `timm:<model>` for any model `timm.list_models()` knows.
Pretrained weights only when asked (`pretrained=True`): nothing touches the network by default.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A residual CNN for 28-32 px images: a stem and three stages (widths w, 2w, 4w), the
    last two halving the resolution, then global average pooling to 4w features."""

    def __init__(self, in_chans: int = 1, width: int = 32, blocks: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layers = [BasicBlock(c, c_out, 1 if i == 0 else 2)]
            layers += [BasicBlock(c_out, c_out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.num_features = c

    def stage_list(self) -> list[nn.Module]:
        """The stages in order (the stem runs with the first): the places a memory can read from."""
        return [nn.Sequential(self.stem, self.stages[0]), *self.stages[1:]]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))  # (B, 4w, H/4, W/4) -> (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))  # (B, 4w)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """airbench's batch norm: no learnt scale (the weight stays 1: the next convolution
    scales), a fast running average (momentum 0.4) and a tiny eps."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _identity_start(conv: nn.Conv2d) -> nn.Conv2d:
    """A convolution that starts as the identity on its first in-channels filters (dirac),
    the rest at PyTorch's default init: a deep stack trains from a signal-preserving start."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:conv.in_channels])
    return conv


class ConvPoolBlock(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU: the second conv and
    everything after run at a quarter of the pixels (the airbench layout)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _identity_start(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
        self.bn1 = _batch_norm(c_out)
        self.conv2 = _identity_start(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.bn2 = _batch_norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)  # (B, c_out, H/2, W/2)
        x = nn.functional.gelu(self.bn1(x))
        return nn.functional.gelu(self.bn2(self.conv2(x)))


class WhiteningStem(nn.Module):
    """The first convolution, k x k without padding, 2 * C * k^2 filters: the training
    patches' eigenvectors scaled to unit variance, and their negatives (`whiten`), then GELU.
    Its weight is never trained (requires_grad False); its bias is (for a few epochs: the
    recipe). k = 2 for colour images, 3 for grey ones (2 x 1 x 4 = 8 channels would be few)."""

    def __init__(self, in_chans: int):
        super().__init__()
        k = 2 if in_chans == 3 else 3
        self.conv = nn.Conv2d(in_chans, 2 * in_chans * k * k, k, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.out_channels = self.conv.out_channels

    @torch.no_grad()
    def whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters from normalised training images (N, C, H, W): every k x k patch."""
        c, k = self.conv.in_channels, self.conv.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H-k+1, W-k+1, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # (P, C*k*k)
        cov = patches.T @ patches / len(patches)  # (C*k*k, C*k*k)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)  # (C*k*k, C*k*k) largest first
        filters = filters.reshape(-1, c, k, k)
        self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.conv(x))  # (B, 2Ck^2, H-k+1, W-k+1)


PROBE_BLOCK = 1  # PoolNet's block whose averaged activations are the probe (chosen on validation: docs/memory.md, "None of these")


class PoolNet(nn.Module):
    """A fast CNN for 28-32 px images, airbench94's layout: a whitening stem, then three
    conv-pool blocks (widths 64, 256, 256), global max pooling to 256 features."""

    def __init__(self, in_chans: int = 3, widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        self.stem = WhiteningStem(in_chans)
        blocks, c = [], self.stem.out_channels
        for w in widths:
            blocks.append(ConvPoolBlock(c, w))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.num_features = c
        self.probe_dim = widths[PROBE_BLOCK]

    def whiten(self, images: torch.Tensor) -> None:
        """Set the first convolution from normalised training images (the recipe's whitening)."""
        self.stem.whiten(images)

    def stage_list(self) -> list[nn.Module]:
        """The stages in order (the stem runs with the first): the places a memory can read from."""
        return [nn.Sequential(self.stem, self.blocks[0]), *self.blocks[1:]]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax((2, 3))  # (B, 256, H', W') -> (B, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))  # (B, 256)

    def forward_with_probe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, 256), probe (B, 256)): the probe is the second block's activations
        averaged over the image, what the ood_score's second part reads (core/novelty.py):
        the statistics of textures and strokes, which tell images of another kind (photos
        to a clothes model) better than the final features trained to tell classes apart."""
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == PROBE_BLOCK:
                probe = h.mean((2, 3))  # (B, 256, H', W') -> (B, 256)
        return self.pool(h), probe


BUILTIN = {
    "small_resnet": dict(width=32, blocks=(1, 1, 1)),  # 128 features, ~0.7M params
    "small_resnet_wide": dict(width=64, blocks=(1, 1, 1)),  # 256 features, ~1.2M params
    "poolnet": dict(),  # 256 features, ~1.9M params, fewer FLOPs than small_resnet_wide; recipe airbench
}


def create_backbone(name: str, in_chans: int, pretrained: bool = False) -> nn.Module:
    """A backbone by name: one of BUILTIN, or `timm:<model>`."""
    if name in BUILTIN:
        if pretrained:
            raise ValueError(f"--pretrained: backbone {name!r} has no pretrained weights")
        return PoolNet(in_chans) if name == "poolnet" else SmallResNet(in_chans, **BUILTIN[name])
    if name.startswith("timm:"):
        import timm

        model_name = name[len("timm:"):]
        if model_name not in timm.list_models(pretrained=False):
            raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models()")
        # num_classes=0 makes timm return pooled features of size model.num_features
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=in_chans)
    raise ValueError(f"unknown backbone {name!r}; valid choices: {sorted(BUILTIN)} or 'timm:<model name>'")
