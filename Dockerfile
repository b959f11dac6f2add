# Memory-augmented image classifier service (CPU).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_STORE=/app/model_store \
    MODEL_NAME=fashion-mnist \
    STATE_DIR=/var/lib/classifier

WORKDIR /app

# CPU-only torch wheels: a fraction of the size of the default CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-deps .

# the trained models are baked in; the feedback store and snapshots live on a volume
COPY model_store ./model_store
RUN useradd --system --uid 10001 --home-dir /app app \
 && mkdir -p /var/lib/classifier \
 && chown app /var/lib/classifier
VOLUME ["/var/lib/classifier"]
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

# one server process per core the container may use (WEB_CONCURRENCY overrides), one /metrics for all
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]
