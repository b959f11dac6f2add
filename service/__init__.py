"""Memory-augmented image classifier and its inference service.

ML core (no web imports): memory, backbones, model, data, train, store, runtime, journal,
images. Web service: app, schemas, metrics, settings, serve_cli. Entry point: `python -m
service {train,serve}`.
"""
