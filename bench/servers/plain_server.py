"""The naive baseline (d): a plain FastAPI endpoint that decodes the image (JSON
{"image_base64": ...}, like our /predict's JSON form) and calls the
model once per request (a sync endpoint: FastAPI runs it on its thread pool), no batching,
no memory lock, no metrics.

    .venv/bin/python -m bench.servers.plain_server --port 8002 [--model fashion-mnist]
"""

from __future__ import annotations

import argparse
import base64

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from service.core.preprocess import ImageLimits, decode_image
from service.core.store import load_model


class Body(BaseModel):
    image_base64: str


def create_plain_app(store: str, model: str) -> FastAPI:
    loaded = load_model(store, model)
    net = loaded.model.for_inference()  # as the service runs it
    app = FastAPI()

    @app.post("/predict")
    def predict(body: Body) -> dict:
        data = base64.b64decode(body.image_base64, validate=True)
        x = decode_image(data, loaded.input, ImageLimits()).unsqueeze(0)  # (1, C, H, W)
        with torch.no_grad():
            p = net.predict(x)
        i = int(p.labels[0])
        return {"predictions": [{"label": loaded.classes[i] if i < len(loaded.classes) else str(i),
                                 "confidence": float(p.confidence[0]), "path": p.paths[0]}]}
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--model", default="fashion-mnist")
    args = ap.parse_args()
    uvicorn.run(create_plain_app(args.store, args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
