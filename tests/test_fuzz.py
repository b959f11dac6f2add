"""Fuzz the HTTP API from its own OpenAPI document with schemathesis, against a real server:
no 5xx, and every response conforms to the schema it declares (status, content type, body).
Each operation's cases come from schemathesis' hypothesis strategy (its pytest plugin does
not load under this pytest version). Excluded: positive_data_acceptance (a schema cannot say
"bytes that decode as an image", so random binary parts are rightly refused with 422)."""

import json
import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from testkit.live import Server
from tests.test_server import AUTH, TOKEN

pytestmark = pytest.mark.server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per operation; `make reliability` runs more


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # the review queue on, every answer queued: its handlers run on real items
    s = Server(tmp_path_factory.mktemp("fuzz"), TOKEN, MAX_FILES="8", REVIEW_QUEUE="on",
               REVIEW_CONFIDENCE_BELOW="1").start()
    yield s
    s.kill()


def operations(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_api_conforms_to_its_schema(live):
    ops = operations(live.url)
    assert {op.path for op in ops} >= {"/predict", "/feedback", "/memory", "/memory/snapshot", "/metrics"}
    tried, failures = 0, []
    reached: dict[str, int] = {}  # operation -> answers other than 401/403: its handler ran
    try:
        for op in ops:
            name = f"{op.method.upper()} {op.path}"
            reached[name] = 0
            # every path that needs the token gets it, so that the fuzzer reaches its handler
            headers = AUTH if op.path.startswith(("/feedback", "/memory/snapshot", "/review")) else None

            @given(case=op.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                nonlocal tried
                tried += 1
                response = case.call(headers=headers)
                if response.status_code not in (401, 403):
                    reached[name] += 1
                # any bytes are "format: binary", but only images are accepted: that check cannot hold
                case.validate_response(response, headers=headers,
                                       excluded_checks=[schemathesis.checks.positive_data_acceptance])
            try:
                run()
            except Exception as e:  # hypothesis re-raises the first failing case of the operation
                failures.append(f"{op.method.upper()} {op.path}: {type(e).__name__}: {str(e)[:500]}")
    finally:
        if os.environ.get("FUZZ_REPORT"):  # the record of this run, whatever it found
            Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(
                {"cases": tried, "operations": len(ops), "max_examples_per_operation": EXAMPLES,
                 "operations_reached": sum(n > 0 for n in reached.values()), "reached": reached,
                 "failing_operations": len(failures), "failures": failures, "server_alive": live.alive(),
                 "schemathesis": schemathesis.__version__}, indent=2))
    print(f"schemathesis: {tried} cases over {len(ops)} operations, {len(failures)} failing operations")
    assert not failures, failures
    assert all(reached.values()), {k: n for k, n in reached.items() if not n}  # every handler ran
    assert live.alive()
