"""EnhancedClassifier: backbone -> features -> (memory | linear head), routed by confidence.

    images (B, C, H, W) -> backbone -> features (B, D)
        features -> memory.retrieve -> memory label, confidence (B,)
        confidence >= threshold ? memory label (memory path) : head(features) (network path)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .backbones import create_backbone
from .memory import EMPTY, MEMORIES, Memory, MemoryConfig, Retrieval, create_memory

MEMORY_KINDS = ("none", *MEMORIES)


@dataclass
class ClassifierConfig:
    backbone: str = "small_resnet"
    """Backbone: a built-in name (small_resnet, small_resnet_wide) or timm:<model>."""
    pretrained: bool = False
    """Load the timm backbone's pretrained weights (needs the network or a local cache)."""
    num_classes: int = 10
    """Classes of the network head."""
    in_chans: int = 1
    """Image channels the model takes (1 grey, 3 RGB)."""
    image_size: int = 28
    """Side of the square images the model takes."""
    memory: str = "cached"
    """Memory kind: none, cached or trainable."""
    memory_size: int = 10000
    """Memory capacity in items."""
    memory_classes: int | None = None
    """Label space of the memory (>= num_classes; room for classes taught by feedback). Default num_classes."""
    confidence_threshold: float = 0.85
    """The memory's answer is used when its confidence reaches this."""
    similarity_threshold: float = 1.0
    """A full memory replaces an item only for an example less similar than this to every item (1.0: always)."""
    temperature: float = 0.1
    """Softmax temperature of retrieval and of the contrastive loss."""
    top_k: int = 5
    """Memory neighbours that vote."""

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"--memory must be one of {MEMORY_KINDS}, got {self.memory!r}")
        if self.memory_classes is None:
            self.memory_classes = self.num_classes
        if self.memory_classes < self.num_classes:
            raise ValueError(f"--memory-classes ({self.memory_classes}) must be >= num_classes ({self.num_classes})")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")

    def memory_config(self, feature_dim: int) -> MemoryConfig:
        return MemoryConfig(capacity=self.memory_size, feature_dim=feature_dim, num_classes=self.memory_classes,
                            similarity_threshold=self.similarity_threshold, temperature=self.temperature,
                            top_k=self.top_k)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    labels: torch.Tensor  # (B,) int64
    confidence: torch.Tensor  # (B,)
    used_memory: torch.Tensor  # (B,) bool: True = memory path
    class_scores: torch.Tensor  # (B, C_mem) memory vote on the memory path, head softmax otherwise
    slot: torch.Tensor  # (B,) nearest memory slot, EMPTY without one
    similarity: torch.Tensor  # (B,) its cosine similarity (0 without one)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per batch: features, memory, head

    @property
    def paths(self) -> list[str]:
        return ["memory" if m else "network" for m in self.used_memory.tolist()]


def route_by_confidence(memory: Retrieval, head_probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Memory answer where its confidence >= threshold, else the head's. Returns labels,
    confidence, used_memory, all (B,)."""
    used_memory = (memory.confidence >= threshold) & (memory.labels != EMPTY)  # (B,)
    head_conf, head_labels = head_probs.max(-1)  # (B,)
    labels = torch.where(used_memory, memory.labels, head_labels)
    confidence = torch.where(used_memory, memory.confidence, head_conf)
    return labels, confidence, used_memory


class EnhancedClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, config.in_chans, config.pretrained)
        self.feature_dim = self.backbone.num_features
        self.head = nn.Linear(self.feature_dim, config.num_classes)
        self.memory: Memory | None = None
        if config.memory != "none":
            mc = config.memory_config(self.feature_dim)
            self.memory = create_memory(config.memory, **asdict(mc))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)  # (B, D)
        logits = self.head(features)  # (B, num_classes)
        return logits, features

    @torch.no_grad()
    def predict(self, images: torch.Tensor, threshold: float | None = None) -> Prediction:
        """Route each image through memory or network; see the module docstring."""
        t0 = time.perf_counter()
        features = self.backbone(images).float()  # (B, D)
        p = self.route_features(features, threshold)
        p.timings_ms["features"] = 1e3 * (time.perf_counter() - t0) - p.timings_ms["memory"] - p.timings_ms["head"]
        return p

    @torch.no_grad()
    def route_features(self, features: torch.Tensor, threshold: float | None = None) -> Prediction:
        """The part of `predict` after the backbone: memory lookup, then the head on the
        samples the memory did not answer. The service holds its memory lock around this."""
        threshold = self.config.confidence_threshold if threshold is None else threshold
        B, C = features.shape[0], self.config.memory_classes
        t1 = time.perf_counter()
        if self.memory is not None and self.memory.size > 0:
            r = self.memory.retrieve(features)
        else:
            r = Retrieval(labels=torch.full((B,), EMPTY), confidence=torch.zeros(B),
                          slots=torch.full((B, 1), EMPTY), similarity=torch.full((B, 1), float("-inf")),
                          class_scores=torch.zeros(B, C))
        t2 = time.perf_counter()
        used_memory = (r.confidence >= threshold) & (r.labels != EMPTY)  # (B,)
        probs = torch.zeros(B, C)
        net = (~used_memory).nonzero().squeeze(1)
        if net.numel():
            head_logits = self.head(features[net]).float()  # (N, num_classes)
            probs[net, : self.config.num_classes] = torch.softmax(head_logits, -1)
        t3 = time.perf_counter()
        labels, confidence, used_memory = route_by_confidence(r, probs, threshold)
        scores = torch.where(used_memory.unsqueeze(-1), r.class_scores, probs)
        nearest_slot = r.slots[:, 0]
        similarity = torch.where(nearest_slot != EMPTY, r.similarity[:, 0], torch.zeros(B))
        timings = {"features": 0.0, "memory": 1e3 * (t2 - t1), "head": 1e3 * (t3 - t2)}
        return Prediction(labels, confidence, used_memory, scores, nearest_slot, similarity, timings)
