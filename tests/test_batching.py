"""The dynamic batcher on its own (fake model) and with a real runtime."""

import asyncio

import pytest
import torch

from service.serving.batching import BatchConfig, DynamicBatcher
from service.serving.feedback_store import Upload
from service.serving.runtime import ModelRuntime
from tests.helpers import save_tiny_model


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """A fake model: records the batch sizes it ran, answers each image's first pixel."""

    def __init__(self, delay=0.0, fail_on=None):
        self.sizes, self.delay, self.fail_on = [], delay, fail_on

    async def __call__(self, images):
        self.sizes.append(len(images))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and (images[:, 0, 0, 0] == self.fail_on).any():
            raise ValueError("model failed")
        return images[:, 0, 0, 0].clone()


def imgs(*values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


async def submit_all(batcher, requests):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_run_as_one_batch_and_get_their_own_rows():
    model = Recorder()
    results = run(submit_all(DynamicBatcher(model, BatchConfig(32, 50.0)), [imgs(i) for i in range(10)]))
    assert model.sizes == [10]
    assert [r.result[r.rows].tolist() for r in results] == [[float(i)] for i in range(10)]
    assert all(r.batch_size == 10 and r.queue_seconds >= 0 for r in results)


def test_batches_never_exceed_the_maximum_and_a_request_is_never_split():
    model = Recorder()
    requests = [imgs(1, 2, 3), imgs(4, 5, 6), imgs(7, 8), imgs(9)]
    results = run(submit_all(DynamicBatcher(model, BatchConfig(4, 50.0)), requests))
    assert max(model.sizes) <= 4 and sum(model.sizes) == 9
    assert [r.result[r.rows].tolist() for r in results] == [[1, 2, 3], [4, 5, 6], [7, 8], [9]]


def test_a_lone_request_waits_at_most_max_wait():
    async def go():
        b = DynamicBatcher(Recorder(), BatchConfig(32, 5.0))
        b.start()
        r = await asyncio.wait_for(b.submit(imgs(1)), 2.0)
        await b.stop()
        return r
    r = run(go())
    assert r.batch_size == 1 and r.queue_seconds < 1.0


def test_requests_arriving_while_the_model_runs_form_the_next_batch():
    model = Recorder(delay=0.05)

    async def go():
        b = DynamicBatcher(model, BatchConfig(32, 0.0))  # no waiting: batches form from the backlog
        b.start()
        first = asyncio.create_task(b.submit(imgs(0)))
        await asyncio.sleep(0.01)  # the model is busy with the first request
        rest = [asyncio.create_task(b.submit(imgs(i))) for i in range(1, 6)]
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out
    run(go())
    assert model.sizes == [1, 5]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    model = Recorder(fail_on=13.0)

    async def go():
        b = DynamicBatcher(model, BatchConfig(32, 20.0))
        b.start()
        bad = await asyncio.gather(b.submit(imgs(13)), b.submit(imgs(1)), return_exceptions=True)
        good = await b.submit(imgs(2))
        await b.stop()
        return bad, good
    bad, good = run(go())
    assert all(isinstance(e, ValueError) for e in bad)
    assert good.result[good.rows].tolist() == [2.0]


@pytest.mark.parametrize("bad", [dict(max_batch_size=0), dict(max_wait_ms=-1)])
def test_batch_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="MAX_BATCH"):
        BatchConfig(**bad)


@pytest.mark.parametrize("exit_stage", ["final", "stage1"])
def test_a_request_gets_the_same_answer_alone_or_in_a_batch(tmp_path, exit_stage):
    save_tiny_model(tmp_path / "store", exit_stage=exit_stage, exit_dim=16)
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    rt.submit_feedback(rt.embed(x[:4]), "Novel", [Upload(b"png %d" % i, "image/png") for i in range(4)])
    # a third of the requests answer from memory
    alone = [rt.predict(x[i:i + 1]) for i in range(12)]

    async def model(images):
        return rt.predict(images)
    batched = run(submit_all(DynamicBatcher(model, BatchConfig(32, 50.0)), [x[i:i + 1] for i in range(12)]))
    assert batched[0].batch_size == 12
    for a, r in zip(alone, batched):
        b = r.result.select(r.rows)
        assert b.prediction.labels.tolist() == a.prediction.labels.tolist()
        assert b.prediction.paths == a.prediction.paths and b.feedback_ids == a.feedback_ids
        assert b.prediction.slot.tolist() == a.prediction.slot.tolist()
        assert b.prediction.confidence.tolist() == pytest.approx(a.prediction.confidence.tolist(), abs=1e-5)
    assert sum(a.prediction.paths[0] == "memory" for a in alone) >= 4


def test_the_default_batcher_runs_a_lone_request_without_waiting_for_a_timer():
    model = Recorder(delay=0.0)

    async def go():
        b = DynamicBatcher(model, BatchConfig())  # adaptive: MAX_BATCH_WAIT_MS 0
        b.start()
        task = asyncio.create_task(b.submit(imgs(7)))
        for _ in range(10):  # a few turns of the event loop, no timer can have fired
            await asyncio.sleep(0)
        ran = list(model.sizes)
        r = await task
        await b.stop()
        return ran, r
    ran, r = run(go())
    assert BatchConfig().max_wait_ms == 0
    assert ran == [1] and r.result[r.rows].tolist() == [7.0]
