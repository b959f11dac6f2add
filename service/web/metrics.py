"""Prometheus metrics of one app instance (its own registry, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
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
        self.memory_size = Gauge("memory_size", "Items held in memory", registry=r)
        self.memory_capacity = Gauge("memory_capacity", "Memory capacity in items", registry=r)
        self.feedback = Counter("feedback", "Feedback images by outcome", ["outcome"], registry=r)
        self.commit_latency = Histogram("feedback_commit_duration_seconds",
                                        "Feedback store commit (group commit, durable) as a request waited for it",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_queue = Histogram("batch_queue_duration_seconds", "Time a /predict request waited for its batch",
                                     buckets=(0.0001, 0.00025, *LATENCY_BUCKETS), registry=r)
        self.batch_size = Histogram("batch_size_images", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.model_info = Info("model", "The served model", registry=r)
