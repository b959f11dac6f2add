"""Prometheus metrics of one app instance.

One process: the app's own registry (so tests can build many apps). Several processes
(`serve --workers N` sets PROMETHEUS_MULTIPROC_DIR before the workers start): every
process writes its values to files in that folder, and /metrics, whichever process answers
it, reads them all (prometheus_client's multiprocess mode), so one scrape sees the whole
server. Counters and histograms add up over processes; each gauge says how processes
combine (`multiprocess_mode`): memory size per live process (a lagging replica shows),
capacity and the model's info as the largest live value.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MODEL_INFO_LABELS = ("name", "version", "memory_kind", "threshold", "policy", "policy_overrides", "device",
                     "engine")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # in multiprocess mode values live in the shared files; the registry only names them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=r)
        self.request_latency = Histogram("http_request_duration_seconds", "Whole request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("predictions", "Images predicted, by path and predicted class",
                                   ["path", "label"], registry=r)
        self.stage_latency = Histogram("prediction_stage_duration_seconds",
                                       "Per-request time of each stage (decode, features, memory, head) by path",
                                       ["stage", "path"], buckets=LATENCY_BUCKETS, registry=r)
        self.memory_size = Gauge("memory_size", "Items held in memory (per process in multiprocess mode)",
                                 registry=r, multiprocess_mode="liveall")
        self.memory_capacity = Gauge("memory_capacity", "Memory capacity in items", registry=r,
                                     multiprocess_mode="livemax")
        self.feedback = Counter("feedback", "Feedback images by outcome", ["outcome"], registry=r)
        self.commit_latency = Histogram("feedback_commit_duration_seconds",
                                        "Feedback store commit (group commit, durable) as a request waited for it",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_queue = Histogram("batch_queue_duration_seconds", "Time a /predict request waited for its batch",
                                     buckets=(0.0001, 0.00025, *LATENCY_BUCKETS), registry=r)
        self.batch_size = Histogram("batch_size_images", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        # 1 while the feedback log tail applies others' feedback, 0 after a failure until it recovers
        self.tail_healthy = Gauge("feedback_tail_healthy", "The feedback log tail is applying the log (per process)",
                                  registry=r, multiprocess_mode="liveall")
        self.tail_healthy.set(1)
        self.tail_failures = Counter("feedback_tail_failures", "Failures of the feedback log tail (each retried)",
                                     registry=r)
        # the review queue (REVIEW_QUEUE=on): one table shared by every process, so its size is
        # the value the last process to write it saw
        self.review_queue_items = Gauge("review_queue_items", "Images waiting in the review queue", registry=r,
                                        multiprocess_mode="livemostrecent")
        self.review_queue_images = Counter("review_queue_images", "Images the model was unsure of, by what became "
                                           "of them: queued, opted_out (the request said Review-Queue: no), busy "
                                           "(too many waiting for the store), failed", ["outcome"], registry=r)
        # the info idiom as a gauge fixed at 1 (prometheus_client's Info has no multiprocess mode)
        self.model_info = Gauge("model_info", "The served model", MODEL_INFO_LABELS, registry=r,
                                multiprocess_mode="livemax")

    def tail_changed(self, error: str | None) -> None:
        """The feedback log tail failed (error) or recovered (None)."""
        self.tail_healthy.set(0 if error else 1)
        if error:
            self.tail_failures.inc()

    def set_model_info(self, **labels: str) -> None:
        self.model_info.labels(**{k: labels[k] for k in MODEL_INFO_LABELS}).set(1)

    def exposition(self) -> bytes:
        """What /metrics answers: this process's registry, or every process's values."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir())
        return generate_latest(registry)

    def process_exited(self) -> None:
        """Drop this process's live gauges from the shared files (its counters stay counted)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid(), multiprocess_dir())
