"""Memory-augmented image classifier and its inference service, in three layers:

- `service.core`: the ML core (model, routing policy, memory, retrieval, backbones, data,
  training, model store, image preprocessing). Imports neither serving nor web code.
- `service.serving`: the served runtime (predict and feedback on a model thread, batching,
  durable feedback state). Imports the core, never the web stack.
- `service.web`: the FastAPI app (routers, schemas, errors, metrics, settings).

Entry point: `python -m service {train,serve}` (service/cli.py).
"""
