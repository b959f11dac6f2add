"""A real Prometheus (Debian's package) scraping a real server on loopback."""

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from testkit.live import ROOT, Server, free_port
from tests.helpers import image_bytes
from tests.test_server import AUTH, TOKEN, predict

pytestmark = pytest.mark.server


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` / .ci/run install Debian's prometheus")
    return path


def test_promtool_accepts_the_metrics(tmp_path, images):
    s = Server(tmp_path, TOKEN).start()
    try:
        predict(s.url, images[0][0])
        text = httpx.get(s.url + "/metrics").text
    finally:
        s.kill()
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_path_usage_abstentions_and_latency(tmp_path, images):
    s = Server(tmp_path / "state", TOKEN).start()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())  # the repo's file, made fast
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{s.port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        taught, noise = images[5][0], image_bytes(seed=3)
        httpx.post(s.url + "/feedback", files={"file": ("x.png", taught, "image/png")}, data={"label": "Bag"},
                   headers=AUTH, timeout=30)
        sent = {"memory": 0, "network": 0, "abstain": 0}  # abstain: "none of these" (a few of the test images)
        until, i = time.monotonic() + 6, 0  # traffic across several 1 s scrapes, so rate() has a slope
        while time.monotonic() < until:
            # every 8th the taught image (memory), every 8th noise (unlike any clothes: abstains)
            data = taught if i % 8 == 0 else noise if i % 8 == 4 else images[i % len(images)][0]
            sent[predict(s.url, data)["path"]] += 1
            i += 1

        def query(q):
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=5)
            return r.json()["data"]["result"]
        deadline = time.monotonic() + 60
        by_path = {}
        while time.monotonic() < deadline:
            try:
                by_path = {x["metric"]["path"]: float(x["value"][1])
                           for x in query('sum by (path) (predictions_total{job="classifier"})')}
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if by_path and sum(by_path.values()) == sum(sent.values()):
                break
            time.sleep(1)
        assert by_path == {k: float(v) for k, v in sent.items() if v}
        assert sent["abstain"] and sent["memory"] and sent["network"]  # every path was counted, abstentions too
        p99 = query('histogram_quantile(0.99, sum by (le) (increase(http_request_duration_seconds_bucket'
                    '{endpoint="/predict"}[1m])))')
        assert p99, "no latency series"
        assert 0 < float(p99[0]["value"][1]) < 5.0  # seconds; a real quantile, not NaN
    finally:
        prom.terminate()
        prom.wait(30)
        s.kill()
