"""The HTTP API through FastAPI's TestClient, on a tiny stored model."""

import base64
import gc
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.web.app import create_app
from service.web.settings import ServiceConfig
from tests.corpus import BAD_FEEDBACK, BAD_PREDICT
from tests.helpers import CLASSES, image_bytes, save_tiny_model

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(**kw):
        save_tiny_model(tmp_path / "store")
        args = dict(model_store=str(tmp_path / "store"), model_name="tiny", api_token=TOKEN,
                    state_dir=str(tmp_path / "var"), snapshot_interval=0, max_upload_bytes=200_000,
                    max_pixels=1_000_000, max_files=8) | kw
        c = TestClient(create_app(ServiceConfig(**args)), raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def png(seed=0, **kw):
    return ("x.png", image_bytes(seed=seed, **kw), "image/png")


def memory_state(client):
    return client.get("/memory").json()


def test_health_and_ready(client):
    assert client.get("/healthz").json()["status"] == "alive"
    r = client.get("/readyz").json()
    assert r["status"] == "ready" and r["model"] == "tiny"


def test_startup_puts_the_loaded_objects_out_of_the_collectors_reach(make_client):
    # a full collection over them stalled every request of the process for ~100 ms
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    client = make_client()
    assert gc.get_freeze_count() > 10_000
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"),
                                      ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("WEBP", "RGB"),
                                      ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB")])
def test_predict_accepts_every_common_format(client, fmt, mode):
    r = client.post("/predict", files={"file": ("img", image_bytes(fmt, mode=mode, size=(40, 30)), "image/x")})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert p["label"] in CLASSES and p["path"] in ("memory", "network")
    assert 0 <= p["confidence"] <= 1 and len(p["top_k"]) == 4
    assert p["nearest"]["slot"] >= 0 and p["latency_ms"] > 0


def test_predict_batch_and_json(client):
    r = client.post("/predict", files=[("file", png(1)), ("file", png(2)), ("file", png(3))])
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3
    body = {"image_base64": base64.b64encode(image_bytes(seed=1)).decode()}
    j = client.post("/predict", json=body)
    assert j.status_code == 200
    assert j.json()["predictions"][0]["label"] == r.json()["predictions"][0]["label"]
    assert j.json()["model_version"] == r.json()["model_version"]


def test_feedback_teaches_an_image_its_label(client):
    img = png(7)
    r = client.post("/feedback", files={"file": img}, data={"label": "two"}, headers=AUTH)
    assert r.status_code == 200, r.text
    item = r.json()["items"][0]
    assert item["action"] in ("added", "replaced") and item["label"] == "two"
    p = client.post("/predict", files={"file": img}).json()["predictions"][0]
    assert p["path"] == "memory" and p["label"] == "two" and p["confidence"] == pytest.approx(1.0)
    assert p["nearest"]["feedback_id"] == item["feedback_id"]


def test_feedback_by_index_and_correction_overwrites(client):
    img = png(8)
    first = client.post("/feedback", files={"file": img}, data={"label": "1"}, headers=AUTH).json()["items"][0]
    again = client.post("/feedback", files={"file": img}, data={"label": "1"}, headers=AUTH).json()["items"][0]
    assert again["action"] == "skipped"
    fix = client.post("/feedback", files={"file": img}, data={"label": "three"}, headers=AUTH).json()["items"][0]
    assert fix["action"] == "replaced" and fix["slot"] == first["slot"] and fix["replaced_label"] == "one"
    assert client.post("/predict", files={"file": img}).json()["predictions"][0]["label"] == "three"


def test_new_class_is_taught_then_predicted_until_label_space_is_full(client):
    a, b, c = png(11), png(12), png(13)
    r = client.post("/feedback", files={"file": a}, data={"label": "Sneaker-v2"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["new_class"] is True
    p = client.post("/predict", files={"file": a}).json()["predictions"][0]
    assert p["label"] == "Sneaker-v2" and p["label_index"] == 4 and p["path"] == "memory"
    assert client.post("/feedback", files={"file": b}, data={"label": "Bag"}, headers=AUTH).status_code == 200
    full = client.post("/feedback", files={"file": c}, data={"label": "Hat"}, headers=AUTH)  # label space 6
    assert full.status_code == 422 and "no room" in full.json()["detail"]
    assert "Sneaker-v2" in memory_state(client)["classes"]


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                            ({"Authorization": f"Bearer {TOKEN[:-1]}x"}, 403),
                                            ({"Authorization": f"Basic {TOKEN}"}, 401)])
def test_writes_need_the_token(client, headers, status):
    before = memory_state(client)
    r = client.post("/feedback", files={"file": png()}, data={"label": "one"}, headers=headers)
    assert r.status_code == status and "error" in r.json()
    assert client.post("/memory/snapshot", headers=headers).status_code == status
    q = client.post(f"/feedback?token={TOKEN}", files={"file": png()}, data={"label": "one"})
    assert q.status_code == 401
    assert memory_state(client) == before


def test_writes_refused_without_configured_token(make_client):
    c = make_client(api_token=None)
    r = c.post("/feedback", files={"file": png()}, data={"label": "one"}, headers=AUTH)
    assert r.status_code == 403 and r.json()["error"] == "writes_disabled"




@pytest.mark.parametrize("name,kw,status", BAD_PREDICT, ids=[b[0] for b in BAD_PREDICT])
def test_bad_predict_input_is_refused_clearly(client, name, kw, status):
    r = client.post("/predict", **kw)
    assert r.status_code == status, r.text
    body = r.json()
    if status == 200:  # odd but valid: answered like any image
        assert len(body["predictions"]) == 1
    else:
        assert body["error"] and body["detail"]


BAD_LABELS = [("", "empty"), ("   ", "empty"), ("7", "out of range"), ("-1", "out of range"),
              ("x" * 100, "longer"), ("bad\x00label", "control"), ("a\nb", "control")]


@pytest.mark.parametrize("label,why", BAD_LABELS)
def test_bad_feedback_labels_change_nothing(client, label, why):
    before = memory_state(client)
    r = client.post("/feedback", files={"file": png()}, data={"label": label}, headers=AUTH)
    assert r.status_code == 422 and why in str(r.json()["detail"])
    assert memory_state(client) == before


def test_feedback_missing_label_or_bad_image_changes_nothing(client):
    before = memory_state(client)
    assert client.post("/feedback", files={"file": png()}, headers=AUTH).status_code == 422
    r = client.post("/feedback", files=[("file", png()), ("file", ("b.png", b"junk", "image/png"))],
                    data={"label": "one"}, headers=AUTH)
    assert r.status_code == 422 and "file 2 of 2" in r.json()["detail"]
    assert memory_state(client) == before


def test_metrics_parse_and_move(client):
    client.post("/predict", files={"file": png()})
    client.post("/feedback", files={"file": png(3)}, data={"label": "one"}, headers=AUTH)
    client.post("/predict", files={"file": png(3)})
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    preds = {tuple(sorted(s.labels.items())): s.value for s in fams["predictions"].samples
             if s.name == "predictions_total"}
    assert sum(preds.values()) == 2
    assert any(dict(k)["path"] == "memory" for k in preds)
    assert any(s.labels.get("outcome") == "added" and s.value == 1 for s in fams["feedback"].samples)
    reqs = [s for s in fams["http_requests"].samples if s.name == "http_requests_total"]
    assert any(s.labels["endpoint"] == "/predict" and s.labels["status"] == "200" and s.value == 2 for s in reqs)
    stages = {s.labels["stage"] for s in fams["prediction_stage_duration_seconds"].samples if "stage" in s.labels}
    assert stages == {"decode", "features", "memory", "head"}
    assert fams["memory_capacity"].samples[0].value == 16
    assert fams["model_info"].samples[0].labels["memory_kind"] == "cached"
    assert fams["model_info"].samples[0].labels["engine"] == "eager"  # the engine in force
    assert any(s.name == "feedback_commit_duration_seconds_count" and s.value == 1
               for s in fams["feedback_commit_duration_seconds"].samples)


def test_snapshot_then_restart_gives_the_same_memory(make_client):
    c = make_client()
    for i in range(3):
        c.post("/feedback", files={"file": png(20 + i)}, data={"label": "Newclass"}, headers=AUTH)
    snap = c.post("/memory/snapshot", headers=AUTH)
    assert snap.status_code == 200 and snap.json()["last_seq"] == 3
    c.post("/feedback", files={"file": png(30)}, data={"label": "zero"}, headers=AUTH)  # in the log only
    before = memory_state(c)
    c.__exit__(None, None, None)
    c2 = make_client()
    after = memory_state(c2)
    assert {k: v for k, v in after.items() if k != "last_snapshot_time"} == \
        {k: v for k, v in before.items() if k != "last_snapshot_time"}
    p = c2.post("/predict", files={"file": png(21)}).json()["predictions"][0]
    assert p["label"] == "Newclass" and p["nearest"]["feedback_id"] == 2


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/feedback", "/memory", "/memory/snapshot", "/metrics", "/healthz", "/readyz"} <= set(paths)
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]


def test_a_failing_store_write_gives_503_and_no_false_ack(client, monkeypatch):
    import sqlite3

    before = memory_state(client)
    store = client.app.state.service.runtime.store

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(store, "_do_append", full)
    r = client.post("/feedback", files={"file": png(40)}, data={"label": "one"}, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"] == "feedback_store_unavailable"
    monkeypatch.undo()
    assert memory_state(client) == before and store.last_seq() == 0


def test_chunked_body_over_limit_is_refused_while_streaming(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000  # 400 kB, no Content-Length: counted as it arrives
    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_inference_runs_off_the_event_loop(client, monkeypatch):
    import threading

    rt = client.app.state.service.runtime
    entered, gate = threading.Event(), threading.Event()
    original = rt.predict

    def held(batch):
        entered.set()
        gate.wait(30)
        return original(batch)
    monkeypatch.setattr(rt, "predict", held)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=client.post("/predict", files={"file": png()})))
    t.start()
    assert entered.wait(30)
    assert client.get("/healthz").status_code == 200  # answered while the model thread is busy
    assert client.get("/memory").status_code == 200
    assert t.is_alive()
    gate.set()
    t.join(30)
    assert result["r"].status_code == 200


@pytest.mark.parametrize("name,kw,status", BAD_FEEDBACK, ids=[b[0] for b in BAD_FEEDBACK])
def test_bad_feedback_is_refused_and_changes_nothing(client, name, kw, status):
    before = memory_state(client)
    r = client.post("/feedback", headers=AUTH, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["detail"]
    assert memory_state(client) == before


def test_batched_and_unbatched_services_give_equal_answers_and_export_queue_time(make_client, tmp_path):
    answers = {}
    for max_batch_size in (1, 32):
        client = make_client(max_batch_size=max_batch_size, state_dir=str(tmp_path / f"var-{max_batch_size}"))
        r = client.post("/predict", files=[("file", png(i)) for i in range(3)])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3
        answers[max_batch_size] = r.json()["predictions"]
        fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        count = {s.name: s.value for s in fams["batch_queue_duration_seconds"].samples}
        assert count["batch_queue_duration_seconds_count"] == (1 if max_batch_size > 1 else 0)
        sizes = {s.name: s.value for s in fams["batch_size_images"].samples}
        assert sizes["batch_size_images_sum"] == 3
    for alone, batched in zip(answers[1], answers[32]):
        assert (alone["label"], alone["path"], alone["nearest"]["slot"]) == \
            (batched["label"], batched["path"], batched["nearest"]["slot"])
        assert alone["confidence"] == pytest.approx(batched["confidence"], abs=1e-5)


@pytest.mark.parametrize("bad", [dict(max_batch_size=0), dict(max_batch_wait_ms=-1.0)])
def test_bad_batching_settings_are_refused(bad):
    with pytest.raises(ValueError, match="MAX_BATCH"):
        ServiceConfig(**bad)


def test_healthz_answers_while_memory_waits_for_the_memory_lock(client):
    import threading

    rt = client.app.state.service.runtime
    answers = {}
    with rt.lock:  # as a long write or snapshot copy would hold it
        waiting = threading.Thread(target=lambda: answers.update(memory=client.get("/memory").status_code))
        waiting.start()
        time.sleep(0.5)  # /memory is in flight, waiting for the lock
        health = threading.Thread(target=lambda: answers.update(health=client.get("/healthz").status_code))
        health.start()
        health.join(10)
        assert answers.get("health") == 200, "the event loop was blocked by /memory waiting for the lock"
        assert "memory" not in answers  # /memory is still waiting, off the loop
    waiting.join(10)
    assert answers["memory"] == 200


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(make_client):
    c = make_client(max_request_pixels=3 * 28 * 28)
    three = [("file", png(i)) for i in range(3)]  # image_bytes gives 28x28 images
    assert c.post("/predict", files=three).status_code == 200
    r = c.post("/predict", files=three + [("file", png(3))])
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"
    r = c.post("/feedback", files=three + [("file", png(3))], data={"label": "Novel"}, headers=AUTH)
    assert r.status_code == 413 and memory_state(c)["feedback_items"] == 0


@pytest.mark.parametrize("path", ["/feedback?before=48894443152177142559065690550621437952",
                                  "/feedback?before=9223372036854775808",  # 2**63: one past the largest
                                  "/feedback/9223372036854775808/image",
                                  "/feedback/48894443152177142559065690550621437952/image"])
def test_feedback_ids_beyond_64_bits_are_refused_not_looked_up(client, path):
    r = client.get(path, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = client.delete("/feedback/48894443152177142559065690550621437952", headers=AUTH)
    assert r.status_code == 422


def test_the_largest_64_bit_feedback_id_is_looked_up(client):
    r = client.get("/feedback?before=9223372036854775807", headers=AUTH)
    assert r.status_code == 200 and r.json()["items"] == []
    assert client.get("/feedback/9223372036854775807/image", headers=AUTH).status_code == 404
