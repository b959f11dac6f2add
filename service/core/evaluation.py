"""Evaluating a classifier as the service routes it: every image's head and memory answers
(`collect_predictions`), the routed accuracy under a policy (`evaluate`), the same for each
threshold of a sweep (`threshold_sweep`) and the sweep's choice (`choose_threshold`); and the
per-image latency of each path (`evaluate_inference_speed`).

Training reads these on its validation split (per-epoch curves, the threshold) and once on
the test set; the benchmarks read them on stored models.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .data import normalize
from .model import EnhancedClassifier
from .routing import RoutingPolicy, route

SWEEP_THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]


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
    each reads its part of the images and every process gets every answer. Runs on the
    model's device (images are moved there a batch at a time); the answers come back on the CPU.

    images (N, C, H, W) uint8 -> {"head": (N,) int64, "mem_label": (N,) int64, "mem_conf": (N,) float}"""
    model.eval()
    device = model.head.weight.device  # the model's, its memory's too
    part = images if comm is None else images[comm.part(len(images))]
    none = torch.zeros(0, dtype=torch.int64, device=device)  # a process with no part still gathers
    out: dict[str, list] = {"head": [none], "mem_label": [none], "mem_conf": [torch.zeros(0, device=device)]}
    for i in range(0, len(part), batch_size):
        x = normalize(part[i:i + batch_size].to(device), mean, std).contiguous(memory_format=torch.channels_last)
        logits, keys = model(x)  # (b, num_classes), (b, D)
        r = model.retrieve(keys.float(), policy)
        out["head"].append(logits.argmax(-1))
        out["mem_label"].append(r.labels)
        out["mem_conf"].append(r.confidence)
    preds = {k: torch.cat(v).cpu() for k, v in out.items()}  # read on the host once: evaluate, gather_rows
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
        x = normalize(images[i:i + 1], mean, std).contiguous(memory_format=torch.channels_last)  # (1, C, H, W)
        t = time.perf_counter()
        p = model.predict(x)
        total = 1e3 * (time.perf_counter() - t)
        if i < 10:  # warm-up
            continue
        per_path["memory" if bool(p.used_memory[0]) else "network"].append(total)  # abstained or not
        for k, v in p.timings_ms.items():
            stages[k].append(v)

    def median(xs: list[float]) -> float:
        return float(torch.tensor(xs).median()) if xs else float("nan")
    result = {f"{k}_ms": median(v) for k, v in stages.items()}
    result.update({f"{k}_path_ms": median(v) for k, v in per_path.items()})
    result.update({f"{k}_path_samples": len(v) for k, v in per_path.items()})
    result["memory_over_network"] = result["memory_path_ms"] / result["network_path_ms"]
    return result
