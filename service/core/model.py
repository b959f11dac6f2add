"""EnhancedClassifier: backbone -> features -> (memory | linear head), routed by confidence.

    images (B, C, H, W) -> backbone stages up to the exit -> hidden (B, C', H', W')
        hidden -> keys (B, D): the pooled features (exit "final") or a small projection
        keys -> memory.retrieve -> memory label, confidence (B,)
        routing.route(policy) ? memory label (memory path: stops here)
                              : rest of the backbone -> head (network path)

With `exit_stage="final"` the memory reads the backbone's last features and both paths
cost the whole backbone. With an earlier exit ("stage1", ...) the memory path skips the
later stages: a batch splits, and only the samples the memory does not answer go on.

Devices: `model.to(device)` moves everything the model holds, the memory included (its state
is buffers and parameters); the taught rows (taught.py, derived, not state) are brought to the
features' device where they are read. Give `predict` images on the model's device: every
tensor made on the way is made there, and the `Prediction` comes back there too
(`Prediction.cpu()` moves it to the host in one go, for whoever reads it there).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .backbones import create_backbone
from .memory import EXACT_MATCH, MEMORIES, Memory, MemoryConfig, Retrieval, create_memory
from .routing import EMPTY, RoutingPolicy, route
from .novelty import Novelty
from .taught import FIT_ITERATIONS, TAUGHT_PER_LABEL, TaughtHead, TaughtRows

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
    similarity_threshold: float = 1.0
    """A full memory replaces an item only for an example less similar than this to every item (1.0: always)."""
    temperature: float = 0.1
    """Softmax temperature of retrieval and of the contrastive loss."""
    exit_stage: str = "final"
    """Backbone stage the memory reads: final (the pooled features) or stage1, stage2, ... (early exit)."""
    exit_dim: int = 128
    """Key size of the projection trained at an early exit (unused with exit_stage final)."""
    replay_per_class: int = 100
    """Training images per class whose features the model keeps to fit taught head rows on (0: none; exit final only)."""
    novelty: bool = True
    """Score how unlike everything known each image is (ood_score; needs a memory): Gaussians fitted on its keys."""
    novelty_probe: bool = True
    """Add the backbone's probe (an earlier block's averaged activations, backbones that have one) to the ood_score."""
    tta: str = "none"
    """Test-time augmentation at inference: none, or flip (features averaged with the mirrored image's: 2x the network cost)."""

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"--memory must be one of {MEMORY_KINDS}, got {self.memory!r}")
        if self.memory_classes is None:
            self.memory_classes = self.num_classes
        if self.memory_classes < self.num_classes:
            raise ValueError(f"--memory-classes ({self.memory_classes}) must be >= num_classes ({self.num_classes})")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.exit_stage != "final" and not re.fullmatch(r"stage[1-9]", self.exit_stage):
            raise ValueError(f"--exit-stage must be final or stage1, stage2, ..., got {self.exit_stage!r}")
        if self.exit_stage != "final" and self.memory == "none":
            raise ValueError("--exit-stage needs a memory (--memory cached or trainable)")
        if self.exit_dim < 1:
            raise ValueError(f"--exit-dim must be >= 1, got {self.exit_dim}")
        if self.replay_per_class < 0:
            raise ValueError(f"--replay-per-class must be >= 0, got {self.replay_per_class}")
        if self.tta not in ("none", "flip"):
            raise ValueError(f"--tta must be none or flip, got {self.tta!r}")
        if self.tta != "none" and self.exit_stage != "final":
            raise ValueError("--tta flip needs the memory to read the final features (--exit-stage final)")

    @property
    def exit_index(self) -> int | None:
        """0-based index of the exit stage; None for final."""
        return None if self.exit_stage == "final" else int(self.exit_stage[len("stage"):]) - 1

    def memory_config(self, feature_dim: int) -> MemoryConfig:
        return MemoryConfig(capacity=self.memory_size, feature_dim=feature_dim, num_classes=self.memory_classes,
                            similarity_threshold=self.similarity_threshold, temperature=self.temperature)

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
    ood_score: torch.Tensor  # (B,) how unlike everything known (core/novelty.py); NaN: the model has no score
    abstained: torch.Tensor  # (B,) bool: ood_score over the policy's ood_threshold ("none of these")
    # per batch: features (up to the exit), memory, head (the rest of the network and the head)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return ["abstain" if a else "memory" if m else "network"
                for m, a in zip(self.used_memory.tolist(), self.abstained.tolist())]

    def cpu(self) -> "Prediction":
        """The same prediction on the host: one copy of each field (none for fields already there)."""
        return Prediction(self.labels.cpu(), self.confidence.cpu(), self.used_memory.cpu(), self.class_scores.cpu(),
                          self.slot.cpu(), self.similarity.cpu(), self.ood_score.cpu(), self.abstained.cpu(),
                          dict(self.timings_ms))

    def select(self, rows: slice) -> "Prediction":
        """These rows of a batch's prediction (timings stay those of the whole batch)."""
        return Prediction(self.labels[rows], self.confidence[rows], self.used_memory[rows], self.class_scores[rows],
                          self.slot[rows], self.similarity[rows], self.ood_score[rows], self.abstained[rows],
                          dict(self.timings_ms))


class ExitProjection(nn.Module):
    """Memory keys from an intermediate feature map: a 4x4 average pool keeps coarse layout
    (a global pool of early, low-level channels loses most of what tells classes apart),
    then one linear layer, trained by the contrastive memory loss."""

    def __init__(self, channels: int, dim: int, grid: int = 4):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(channels * grid * grid, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(h, self.grid)  # (B, C', g, g)
        return self.proj(pooled.flatten(1))  # (B, D)


class EnhancedClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, config.in_chans, config.pretrained)
        self.feature_dim = self.backbone.num_features
        self.head = nn.Linear(self.feature_dim, config.num_classes)
        self.exit_index = config.exit_index
        self.exit_proj: ExitProjection | None = None
        key_dim = self.feature_dim
        if self.exit_index is not None:
            stages = getattr(self.backbone, "stage_list", None)
            n = len(stages()) if stages else 0
            if not self.exit_index < n - 1:
                raise ValueError(f"--exit-stage {config.exit_stage}: backbone {config.backbone} has "
                                 f"{'no stages to exit from' if not n else f'exits stage1..stage{n - 1}'}")
            with torch.no_grad():  # channels at the exit, from a dry run
                probe = torch.zeros(1, config.in_chans, config.image_size, config.image_size)
                for stage in stages()[:self.exit_index + 1]:
                    probe = stage(probe)
            self.exit_proj = ExitProjection(probe.shape[1], config.exit_dim)
            key_dim = config.exit_dim
        self.key_dim = key_dim
        # how predictions are routed: set by training (chosen on its validation split) and
        # by the model store from the manifest; configuration, not a tensor, so not in state_dict
        self.policy = RoutingPolicy()
        self.channels_last = False  # set by for_inference: inputs are converted to match
        self.memory: Memory | None = None
        if config.memory != "none":
            mc = config.memory_config(key_dim)
            self.memory = create_memory(config.memory, **asdict(mc))
        # taught head rows read the head's input: only where the memory keys are those features
        self.taught: TaughtHead | None = None
        if config.replay_per_class and self.exit_index is None and self.memory is not None:
            self.taught = TaughtHead(self.feature_dim, config.replay_per_class * config.num_classes)
        # "none of these": the ood_score of every answer, from the memory's keys (calibrated after training)
        self.novelty: Novelty | None = None
        if config.novelty and self.memory is not None:
            probe_dim = getattr(self.backbone, "probe_dim", 0) if config.novelty_probe else 0
            self.novelty = Novelty(key_dim, config.memory_classes, probe_dim, config.num_classes)

    def for_inference(self) -> "EnhancedClassifier":
        """Eval mode with the convolutions' weights in channels-last layout, which oneDNN runs
        faster on CPU for these small images (1.1-1.5x at batch 32, BENCHMARKS.md); `embed`
        then converts its input to match. Answers stay the same up to float rounding."""
        self.eval()
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def _split_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        stages = self.backbone.stage_list()
        return stages[:self.exit_index + 1], stages[self.exit_index + 1:]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (memory keys (B, D), hidden): the backbone up to the exit only. `hidden` is
        what `network_logits` continues from (the pooled features for exit final)."""
        keys, hidden, _ = self.encode(images, probe=False)
        return keys, hidden

    def encode(self, images: torch.Tensor, probe: bool | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`embed`, and the probe (B, P) the ood_score reads (core/novelty.py) where the model
        has one and `probe` asks for it (None: where the score uses it, i.e. it is calibrated;
        True: also before, to calibrate it); None otherwise."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.exit_proj is None:
            novelty = self.novelty
            probe = novelty is not None and novelty.has_probe and (novelty.probe_calibrated if probe is None else probe) \
                and getattr(self.backbone, "probe_dim", 0) > 0  # an engine made without one has none
            run = self.backbone.forward_with_probe if probe else lambda x: (self.backbone(x), None)
            features, probes = run(images)  # (B, D), (B, P) or None
            if self.config.tta == "flip" and not self.training:
                # the mirrored image's features averaged in: the head is linear, so its logits
                # are the two views' mean, and the memory's keys and queries both see it
                mirrored, mirrored_probes = run(images.flip(-1))
                features = 0.5 * (features + mirrored)
                probes = None if probes is None else 0.5 * (probes + mirrored_probes)
            return features, features, probes
        h = images
        for stage in self._split_stages()[0]:
            h = stage(h)  # ends (B, C', H', W')
        return self.exit_proj(h), h, None

    def network_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rest of the backbone after the exit, then the head: (B, ...) -> (B, num_classes)."""
        if self.exit_proj is None:
            return self.head(hidden)
        h = hidden
        for stage in self._split_stages()[1]:
            h = stage(h)
        return self.head(self.backbone.pool(h))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (logits (B, num_classes), memory keys (B, D)); every sample runs everything."""
        keys, hidden = self.embed(images)
        return self.network_logits(hidden), keys

    @torch.no_grad()
    def predict(self, images: torch.Tensor, policy: RoutingPolicy | None = None,
                read_memory: Callable[[torch.Tensor, RoutingPolicy], Retrieval] | None = None) -> Prediction:
        """Route each image through memory or network; see the module docstring. `read_memory`
        replaces `self.retrieve` (the service wraps it in its memory lock). `images` on the
        model's device; the Prediction is on that device (see `finish`)."""
        policy = self.policy if policy is None else policy
        t0 = time.perf_counter()
        keys, hidden, probes = self.encode(images)  # (B, D), the exit's activations, (B, P) or None
        t1 = time.perf_counter()
        r = (read_memory or self.retrieve)(keys.float(), policy)
        t2 = time.perf_counter()
        p = self.finish(r, hidden, policy, probes)
        p.timings_ms.update(features=1e3 * (t1 - t0), memory=1e3 * (t2 - t1))
        return p

    @torch.no_grad()
    def retrieve(self, keys: torch.Tensor, policy: RoutingPolicy | None = None) -> Retrieval:
        """The memory's answer for (B, D) keys (an empty answer without memory), on the keys'
        device (the memory's)."""
        policy = self.policy if policy is None else policy
        B, dev = keys.shape[0], keys.device
        if self.memory is not None and self.memory.size > 0:
            r = self.memory.retrieve(keys, policy.neighbours, policy.class_balance)
            if self.novelty is not None and self.novelty.calibrated:
                r.class_distance = self.novelty.distances(self.memory, keys)  # (B, C)
                r.ood_score = r.class_distance.min(1).values
            return r
        return Retrieval(labels=torch.full((B,), EMPTY, device=dev), confidence=torch.zeros(B, device=dev),
                         slots=torch.full((B, 1), EMPTY, device=dev),
                         similarity=torch.full((B, 1), float("-inf"), device=dev),
                         class_scores=torch.zeros(B, self.config.memory_classes, device=dev))

    @torch.no_grad()
    def taught_examples(self, slots: torch.Tensor, policy: RoutingPolicy | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the taught rows are fitted on: (features (N, D), labels (N,)) of the memory
        items in `slots` (the service passes the slots that hold feedback), the newest
        TAUGHT_PER_LABEL of each label, so that the fit's cost stays bounded. On the memory's device."""
        policy = self.policy if policy is None else policy
        if self.taught is None or self.memory is None or not policy.taught_rows:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)  # no rows to fit (a fit runs on the host)
        dev = self.memory.labels.device
        slots = slots.to(dev)
        slots = slots[torch.argsort(self.memory.written_at[slots], descending=True, stable=True)]
        labels = self.memory.labels[slots]
        rank = torch.zeros_like(labels)
        for y in labels.unique():
            mine = labels == y
            rank[mine] = torch.arange(int(mine.sum()), device=dev)
        slots = slots[rank < TAUGHT_PER_LABEL]
        return self.memory.features_of(slots), self.memory.labels[slots]

    def fit_taught(self, examples: tuple[torch.Tensor, torch.Tensor], policy: RoutingPolicy | None = None,
                   iterations: int = FIT_ITERATIONS, warm: bool = False, stop=None) -> bool:
        """Refit the taught head rows on `taught_examples(...)` (see service/core/taught.py);
        False when stopped (`iterations`, `stop`) before the minimum."""
        if self.taught is None:
            return True
        policy = self.policy if policy is None else policy
        return self.taught.fit(self.head, *examples, policy.taught_l2, iterations, warm, stop)

    @torch.no_grad()
    def finish(self, r: Retrieval, hidden: torch.Tensor, policy: RoutingPolicy,
               probes: torch.Tensor | None = None) -> Prediction:
        """Memory answer where `route` says so; the rest of the network (one batched call) for
        the others. With taught rows the head is extended by them (see routing). `probes`
        (from `encode`) complete the ood_score where the model has them: without them a model
        whose probe is calibrated scores the memory's part alone, in other units than its
        ood_threshold (callers reading only labels may leave them out).

        Device: every tensor is made on `hidden`'s device (the model's), and the Prediction's
        fields stay there: nothing is copied to the host here (`Prediction.cpu()` does it in
        one go for a reader on the host). The timings are host clock readings: on an
        asynchronous device they time the queueing of the work."""
        B, C, H = r.labels.shape[0], self.config.memory_classes, self.config.num_classes
        dev = hidden.device
        t2 = time.perf_counter()
        used_memory = route(r.labels, r.confidence, policy, H)  # (B,)
        probs = torch.zeros(B, C, device=dev)
        taught = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = self.taught.rows if policy.taught_rows and self.taught is not None else None  # read once
        if rows is not None and rows.labels.numel():  # exit final: `hidden` are the head's input features
            rows = _rows_on(rows, dev)
            new = rows.labels >= H  # (T,) rows of classes the head lacks
            bias = torch.where(new, policy.taught_bias, policy.correction_bias)  # (T,)
            row_logits = rows.logits(hidden) + bias  # (B, T)
            if policy.taught_distance_weight and r.class_distance is not None:
                # local evidence for a new class: nearer its taught examples than any trained class
                d = r.class_distance  # (B, C)
                evidence = d[:, :H].min(1, keepdim=True).values - d[:, rows.labels]  # (B, T)
                evidence = torch.nan_to_num(evidence, nan=0.0, posinf=0.0, neginf=0.0)
                row_logits = row_logits + policy.taught_distance_weight * evidence * new
            logits = torch.cat([self.head(hidden).float(), row_logits], 1)  # (B, H + T)
            # a taught row outscores every trained row; an exact match in memory still decides
            # (a taught image asked again is answered by its own item, confidence 1)
            exact = used_memory & (r.similarity[:, 0] >= EXACT_MATCH)  # (B,)
            taught = (logits.argmax(-1) >= H) & ~exact  # (B,)
            to_label = torch.cat([torch.arange(H, device=dev), rows.labels])  # (H + T,) the label of each row
            probs.index_add_(1, to_label, torch.softmax(logits, -1))  # (B, C) a label's rows summed
            used_memory = used_memory & ~taught
        else:
            net = (~used_memory).nonzero().squeeze(1)
            if net.numel():
                head_logits = self.network_logits(hidden[net]).float()  # (N, num_classes)
                probs[net, :H] = torch.softmax(head_logits, -1)
        t3 = time.perf_counter()
        head_conf, head_labels = probs.max(-1)  # (B,)
        labels = torch.where(used_memory, r.labels, head_labels)
        confidence = torch.where(used_memory, r.confidence, head_conf)
        scores = torch.where(used_memory.unsqueeze(-1), r.class_scores, probs)
        used_memory = used_memory | taught  # answers of taught rows count as the memory path
        nearest_slot = r.slots[:, 0]
        similarity = torch.where(nearest_slot != EMPTY, r.similarity[:, 0], 0.0)  # (B,)
        ood = torch.full((B,), float("nan"), device=dev) if r.ood_score is None else \
            self.novelty.combine(r.ood_score, probes)  # (B,)
        abstained = ood > policy.ood_threshold if policy.ood_threshold is not None else torch.zeros_like(used_memory)
        abstained = abstained & ~(r.similarity[:, 0] >= EXACT_MATCH)  # the memory holds this very image: known
        timings = {"features": 0.0, "memory": 0.0, "head": 1e3 * (t3 - t2)}
        return Prediction(labels, confidence, used_memory, scores, nearest_slot, similarity, ood, abstained, timings)


def _rows_on(rows: TaughtRows, device: torch.device) -> TaughtRows:
    """The taught rows on `device`: themselves when there already. They are derived, not
    module state (taught.py), so `model.to(device)` does not move them, and a fit makes them
    on the host; a handful of rows, copied where they are read."""
    if rows.weight.device == device:
        return rows
    return TaughtRows(rows.weight.to(device), rows.bias.to(device), rows.labels.to(device))
