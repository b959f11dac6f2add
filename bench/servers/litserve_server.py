"""The same stored model served by LitServe with its own dynamic batching: the load
benchmark's comparison point (c). Takes our /predict's JSON form, {"image_base64": "..."}:
LitServe 0.2.19 cannot hand a multipart upload to its inference process (the parsed form
does not pickle: "Pickling an AuthenticationString object is disallowed").

    .venv/bin/python -m bench.servers.litserve_server --port 8001 [--model fashion-mnist]
        [--max-batch-size 32] [--workers 2] [--engine eager|openvino-int8|auto]

--engine serves the model as our service does with ENGINE (service/core/engine.py): eager
(torch fp32, the model a user would hand LitServe) or the stored model's int8 engine with
its own memory keys and thresholds, so the two servers can be compared on the same network.
"""

from __future__ import annotations

import argparse
import base64
import os

import litserve as ls
import torch

from service.core.engine import load_engine_model
from service.core.preprocess import ImageLimits, decode_image


class MemoryClassifierAPI(ls.LitAPI):
    def __init__(self, store: str, model: str, workers: int = 1, engine: str = "eager", **kw):
        super().__init__(**kw)
        self.store, self.model_name, self.workers, self.engine = store, model, workers, engine

    def setup(self, device):
        # the cores shared among the inference workers: two workers with two threads each
        # would oversubscribe a 2-core machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))  # the engine takes torch's count too
        self.device = device  # LitServe's choice per worker: "cpu" or "cuda:N"
        self.loaded = load_engine_model(self.store, self.model_name, self.engine, device)
        self.model = self.loaded.model.for_inference().to(device)  # as the service runs it
        self.limits = ImageLimits()

    def decode_request(self, request):
        data = base64.b64decode(request["image_base64"], validate=True)
        return decode_image(data, self.loaded.input, self.limits)  # (C, H, W)

    def batch(self, inputs):
        return torch.stack(inputs)  # (B, C, H, W)

    def predict(self, x):
        p = self.model.predict(x.to(self.device, non_blocking=True)).cpu()
        return [{"label": self.loaded.classes[int(i)] if int(i) < len(self.loaded.classes) else str(int(i)),
                 "confidence": float(c), "path": path}
                for i, c, path in zip(p.labels, p.confidence, p.paths)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"predictions": [output]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--model", default="fashion-mnist")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    ap.add_argument("--workers", type=int, default=1, help="LitServe workers_per_device (inference processes)")
    ap.add_argument("--slow-queue", action="store_true", help="multiprocessing queues instead of ZeroMQ")
    ap.add_argument("--accelerator", default="cpu", help="LitServe's accelerator: cpu, cuda or auto")
    ap.add_argument("--engine", default="eager", choices=["eager", "openvino-int8", "auto"],
                    help="the network's engine, as our ENGINE setting (default eager: torch fp32)")
    args = ap.parse_args()
    api = MemoryClassifierAPI(args.store, args.model, args.workers, args.engine, max_batch_size=args.max_batch_size,
                              batch_timeout=args.batch_timeout)
    # fast_queue: ZeroMQ between the API and inference processes, LitServe's setting for >100 req/s
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers,
                          fast_queue=not args.slow_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
