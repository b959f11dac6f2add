"""Issue 24, item 4: the review queue (REVIEW_QUEUE=on). Images the model was unsure of
(abstained, or less confident than REVIEW_CONFIDENCE_BELOW) are kept in the feedback store's
`review` table, bounded in count and age, never for a request that said `Review-Queue: no`,
and nothing at all while it is off; listed newest first with the best guess; taught (the
feedback use case) or dismissed (deleted and erased from the database's files); a forget of
the same image removes it. Through the HTTP API on a tiny model (SQLite), the store itself on
SQLite and PostgreSQL, and one API test on PostgreSQL. The page: tests/test_review_page.py."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.serving.feedback_store import NotFound, ReviewOffer, Upload, open_store
from service.web.app import create_app
from service.web.settings import ServiceConfig
from testkit.postgres import Postgres, wait_until
from tests.test_app import AUTH, TOKEN
from tests.test_feedback_integrity import files_holding, noise_png, windows
from tests.test_novelty import calibrated_tiny_store


@pytest.fixture
def make_client(tmp_path):
    """An app on the tiny model with its ood_score calibrated; the review queue on and, unless
    told otherwise, every answer less than certain joins it (REVIEW_CONFIDENCE_BELOW 1)."""
    clients = []
    store = calibrated_tiny_store(tmp_path)

    def make(**kw):
        args = dict(model_store=str(store), model_name="tiny", api_token=TOKEN, state_dir=str(tmp_path / "var"),
                    snapshot_interval=0, max_upload_bytes=200_000, max_pixels=1_000_000, max_files=8,
                    review_queue=True, review_confidence_below=1.0) | kw
        c = TestClient(create_app(ServiceConfig(**args)), raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.__exit__(None, None, None)


def predict(client, *pngs: bytes, headers: dict | None = None):
    r = client.post("/predict", files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
                    headers=headers or {})
    settle(client)
    return r


def settle(client):
    """Wait for the images handed to the store's writer to be committed."""
    queue = client.app.state.review_queue
    if queue is not None:
        assert wait_until(lambda: queue.pending == 0, timeout=30)


def queued(client) -> int:
    return client.app.state.service.runtime.store.review_size()


def listing(client, **params):
    r = client.get("/review", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def metric(client, name, **labels):
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# --- what joins the queue, and what never does ---------------------------------------------------

def test_with_the_queue_off_no_image_is_kept_anywhere_and_its_endpoints_say_it_is_off(make_client, tmp_path):
    client = make_client(review_queue=False, ood_threshold=0.0)  # every answer abstains
    pngs = [noise_png(i) for i in range(3)]
    r = predict(client, *pngs)
    assert r.status_code == 200 and all(p["abstained"] for p in r.json()["predictions"])
    assert queued(client) == 0
    assert files_holding(tmp_path / "var", [w for p in pngs for w in windows(p)]) == []
    r = client.get("/review", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == "review_queue_off"
    assert client.delete("/review/1", headers=AUTH).json()["error"] == "review_queue_off"


def test_abstained_answers_join_the_queue_and_confident_ones_do_not(make_client):
    client = make_client(ood_threshold=0.0, review_confidence_below=0.0)  # abstaining is the only way in
    r = predict(client, noise_png(1))
    p = r.json()["predictions"][0]
    assert p["path"] == "abstain"
    [item] = listing(client)["items"]
    assert (item["label"], item["path"], item["abstained"]) == (p["label"], "abstain", True)
    assert item["ood_score"] == pytest.approx(p["ood_score"]) and item["confidence"] == pytest.approx(p["confidence"])

    confident = make_client(state_dir=str(client.app.state.service.config.state_dir) + "-2", ood_threshold=1e9,
                            review_confidence_below=0.0)
    r = predict(confident, noise_png(2), noise_png(3))
    assert not any(p["abstained"] for p in r.json()["predictions"])
    assert queued(confident) == 0


def test_answers_less_confident_than_the_setting_join_the_queue(make_client):
    client = make_client(ood_threshold=1e9)  # nothing abstains
    answers = predict(client, noise_png(1), noise_png(2)).json()["predictions"]
    threshold = sorted(p["confidence"] for p in answers)[1]  # between the two answers' confidences
    other = make_client(state_dir=str(client.app.state.service.config.state_dir) + "-2", ood_threshold=1e9,
                        review_confidence_below=threshold)
    predict(other, noise_png(1), noise_png(2))
    [item] = listing(other)["items"]
    assert item["confidence"] < threshold and listing(other)["confidence_below"] == threshold


def test_the_confidence_bar_defaults_to_the_routing_policys_threshold(make_client):
    client = make_client(review_confidence_below=None, confidence_threshold=0.42)
    assert listing(client)["confidence_below"] == 0.42


def test_a_request_that_says_no_is_never_kept(make_client, tmp_path):
    client = make_client()
    pngs = [noise_png(i) for i in range(3)]
    r = predict(client, *pngs, headers={"Review-Queue": "no"})
    assert r.status_code == 200
    assert queued(client) == 0
    assert files_holding(tmp_path / "var", [w for p in pngs for w in windows(p)]) == []
    assert metric(client, "review_queue_images_total", outcome="opted_out") == 3
    predict(client, pngs[0], headers={"Review-Queue": "yes"})
    assert queued(client) == 1


def test_a_misspelt_review_queue_header_is_refused_naming_it_and_nothing_is_kept(make_client):
    client = make_client()
    r = predict(client, noise_png(1), headers={"Review-Queue": "nope"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"][0]["loc"] == ["header", "Review-Queue"]
    assert queued(client) == 0


def test_the_same_image_twice_is_one_item_refreshed_to_the_top(make_client):
    client = make_client()
    a, b = noise_png(1), noise_png(2)
    predict(client, a)
    predict(client, b)
    predict(client, a)
    items = listing(client)["items"]
    assert len(items) == 2
    assert client.get(f"/review/{items[0]['id']}/image", headers=AUTH).content == a


# --- bounds -----------------------------------------------------------------------------------------

def test_the_queue_keeps_the_newest_images_up_to_its_bound_newest_first(make_client):
    client = make_client(review_queue_max=3)
    pngs = [noise_png(i) for i in range(5)]
    for p in pngs:
        predict(client, p)
    body = listing(client)
    assert body["size"] == 3 and body["max_items"] == 3
    shown = [client.get(f"/review/{i['id']}/image", headers=AUTH).content for i in body["items"]]
    assert shown == pngs[:1:-1]  # 4, 3, 2: newest first
    times = [i["time"] for i in body["items"]]
    assert times == sorted(times, reverse=True)
    assert metric(client, "review_queue_items") == 3


def test_images_older_than_the_age_bound_are_dropped_when_others_join_and_by_the_prune(make_client):
    client = make_client(review_queue_max_age=1.0)
    predict(client, noise_png(1))
    time.sleep(1.1)
    assert listing(client)["items"] == []  # expired: no longer listed
    predict(client, noise_png(2))  # joining drops the expired one
    assert queued(client) == 1
    time.sleep(1.1)
    assert client.app.state.review_queue.prune() == 1  # the app runs this every PRUNE_INTERVAL
    assert queued(client) == 0


def test_the_images_wait_for_the_store_in_bounded_number(make_client, monkeypatch):
    from service.serving import review_queue

    client = make_client()
    queue = client.app.state.review_queue
    monkeypatch.setattr(review_queue, "MAX_PENDING", 0)  # as if the store were that far behind
    predict(client, noise_png(1))
    assert queue.pending == 0 and queued(client) == 0
    assert metric(client, "review_queue_images_total", outcome="busy") == 1


# --- teach, dismiss, forget ---------------------------------------------------------------------------

def test_teaching_an_item_makes_it_feedback_with_its_image_and_removes_it(make_client):
    client = make_client()
    png = noise_png(7)
    predict(client, png)
    [item] = listing(client)["items"]
    r = client.post(f"/review/{item['id']}/teach", json={"label": "Novel"}, headers=AUTH)
    assert r.status_code == 200, r.text
    taught = r.json()
    assert taught["new_class"] and taught["items"][0]["label"] == "Novel"
    fid = taught["items"][0]["feedback_id"]
    assert client.get(f"/feedback/{fid}/image", headers=AUTH).content == png
    assert [e["label"] for e in client.get("/feedback", headers=AUTH).json()["items"]] == ["Novel"]
    assert listing(client)["items"] == [] and queued(client) == 0
    assert client.post(f"/review/{item['id']}/teach", json={"label": "Novel"}, headers=AUTH).status_code == 404


def test_a_bad_label_or_body_is_refused_naming_it_and_the_item_stays(make_client):
    client = make_client()
    predict(client, noise_png(7))
    [item] = listing(client)["items"]
    url = f"/review/{item['id']}/teach"
    r = client.post(url, json={"label": "x" * 100}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"] == "invalid_label" and "64" in r.json()["detail"]
    r = client.post(url, json={"lable": "Bag"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "label"]
    r = client.post("/review/0/teach", json={"label": "Bag"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "item_id"]
    assert client.post("/review/999/teach", json={"label": "Bag"}, headers=AUTH).json()["error"] == "not_found"
    assert listing(client)["items"] == [item]
    assert client.get("/feedback", headers=AUTH).json()["items"] == []


def test_the_queue_needs_the_token(make_client):
    client = make_client()
    predict(client, noise_png(1))
    assert client.get("/review").status_code == 401
    assert client.get("/review/1/image").status_code == 401
    assert client.delete("/review/1", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert queued(client) == 1


def test_a_dismissed_item_is_deleted_and_erased_from_the_database_files(make_client, tmp_path):
    client = make_client()
    png, kept = noise_png(11, size=96), noise_png(12)  # sizes apart: their PNG headers differ
    predict(client, png)
    predict(client, kept)
    item = next(i for i in listing(client)["items"]
                if client.get(f"/review/{i['id']}/image", headers=AUTH).content == png)
    needles = windows(png) + [hashlib.sha256(png).hexdigest().encode()]
    assert files_holding(tmp_path / "var", needles), "the test must see the image before the dismissal"
    r = client.delete(f"/review/{item['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"id": item["id"], "dismissed": True}
    assert files_holding(tmp_path / "var", needles) == []
    assert client.get(f"/review/{item['id']}/image", headers=AUTH).status_code == 404
    assert client.delete(f"/review/{item['id']}", headers=AUTH).status_code == 404
    assert [client.get(f"/review/{i['id']}/image", headers=AUTH).content for i in listing(client)["items"]] == [kept]


def test_forgetting_feedback_of_the_same_image_removes_it_from_the_queue(make_client, tmp_path):
    client = make_client()
    png = noise_png(21)
    predict(client, png)
    assert queued(client) == 1
    r = client.post("/feedback", files={"file": ("a.png", png, "image/png")}, data={"label": "one"}, headers=AUTH)
    fid = r.json()["items"][0]["feedback_id"]
    assert client.delete(f"/feedback/{fid}", headers=AUTH).status_code == 200
    assert queued(client) == 0
    assert files_holding(tmp_path / "var", windows(png)) == []


def test_server_processes_share_one_queue(make_client):
    one, two = make_client(), make_client()  # one state dir: one SQLite store
    predict(one, noise_png(1))
    [item] = listing(two)["items"]
    assert two.delete(f"/review/{item['id']}", headers=AUTH).status_code == 200
    assert listing(one)["items"] == []


# --- the store itself, on both databases ----------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    folder = tempfile.mkdtemp(prefix="test-review-pg-")  # postgres must read it: not under pytest's 0700 folder
    try:
        with Postgres(folder) as pg:
            yield pg
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """A fresh, empty store: an SQLite file, or a new database on the module's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    import psycopg

    pg = request.getfixturevalue("postgres")
    name = f"review_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def store(store_url, tmp_path):
    s = open_store(store_url, tmp_path)
    yield s
    s.close()


def offer(i: int, label: str = "Bag") -> ReviewOffer:
    return ReviewOffer(noise_png(i), "image/png", label, 0.4, 12.5, True, "abstain", "v1")


def test_the_store_keeps_the_newest_within_bounds_and_lists_them_newest_first(store):
    for i in range(5):
        change = store.review_add_later(offer(i), max_items=3, max_age=3600).result(30)
    assert change.size == 3
    items = store.review_items(10, since=0)
    assert [store.review_item(it.id, 0)[1] for it in items] == [noise_png(4), noise_png(3), noise_png(2)]
    first = items[0]
    assert (first.label, first.confidence, first.ood_score, first.abstained, first.path, first.content_type) == \
        ("Bag", 0.4, 12.5, True, "abstain", "image/png")


def test_the_store_drops_expired_items_and_deletes_on_request(store):
    store.review_add_later(offer(1), max_items=10, max_age=3600).result(30)
    time.sleep(0.05)
    assert store.review_prune(10, 0.01, erase_earlier=False).deleted == 1
    change = store.review_add_later(offer(2), max_items=10, max_age=3600).result(30)
    assert store.review_delete(change.id).size == 0
    with pytest.raises(NotFound):
        store.review_delete(change.id)
    with pytest.raises(NotFound):
        store.review_item(change.id, 0)


def test_a_forget_in_the_store_deletes_the_queued_copy_of_its_image(store):
    import numpy as np

    png = noise_png(5)
    store.review_add_later(offer(5), max_items=10, max_age=3600).result(30)
    store.review_add_later(offer(6), max_items=10, max_age=3600).result(30)
    seq = store.append("r1", None, None, "Bag", [Upload(png, "image/png")], "v1", [np.zeros(4, np.float32)]).seqs[0]
    assert store.forget(seq) is not None
    assert [store.review_item(i.id, 0)[1] for i in store.review_items(10, 0)] == [noise_png(6)]


@pytest.mark.postgres
def test_teach_dismiss_and_forget_through_the_api_on_postgresql(make_client, postgres):
    import psycopg

    name = f"review_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    client = make_client(feedback_db=postgres.url.rsplit("/", 1)[0] + "/" + name)
    a, b, c = noise_png(31), noise_png(32), noise_png(33)
    for p in (a, b, c):
        predict(client, p)
    ids = {client.get(f"/review/{i['id']}/image", headers=AUTH).content: i["id"] for i in listing(client)["items"]}
    r = client.post(f"/review/{ids[a]}/teach", json={"label": "Novel"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["items"][0]["label"] == "Novel"
    assert client.delete(f"/review/{ids[b]}", headers=AUTH).status_code == 200
    r = client.post("/feedback", files={"file": ("c.png", c, "image/png")}, data={"label": "one"}, headers=AUTH)
    assert client.delete(f"/feedback/{r.json()['items'][0]['feedback_id']}", headers=AUTH).status_code == 200
    assert listing(client)["items"] == [] and queued(client) == 0
    assert [e["label"] for e in client.get("/feedback", headers=AUTH).json()["items"]] == ["one", "Novel"]


def test_a_row_the_database_refuses_fails_alone_and_feedback_goes_on(store):
    import numpy as np

    from service.serving.feedback_store import FeedbackStoreError

    bad = ReviewOffer(noise_png(8), "image/png", None, 0.4, None, False, "network", "v1")  # label NOT NULL
    # queued together with a feedback example: one group commit when the writer takes both
    refused = store.review_add_later(bad, max_items=10, max_age=3600)
    appended = store.append("r1", None, None, "Bag", [Upload(noise_png(9), "image/png")], "v1",
                            [np.zeros(4, np.float32)])
    with pytest.raises(FeedbackStoreError, match="refused"):
        refused.result(30)
    assert appended.seqs == [1] and store.review_size() == 0
