"""Taught head rows (service/core/taught.py): fitted on taught examples against the replay
features, trained rows frozen, deterministic, refitted by the runtime as the log changes."""

import torch
import torch.nn as nn

from service.core.routing import RoutingPolicy
from service.core.taught import FIT_GTOL, TaughtHead

D = 8


def cluster(centre: int, n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, D, generator=g)
    x[:, centre] += scale
    return x


def two_class_head() -> nn.Linear:
    head = nn.Linear(D, 2)
    with torch.no_grad():
        head.weight.copy_(2.0 * torch.eye(D)[:2])
        head.bias.zero_()
    return head


def fitted_head(taught_x, taught_y, l2=1e-3) -> TaughtHead:
    th = TaughtHead(D, replay_size=40)
    th.replay_features.copy_(torch.cat([cluster(0, 20, 1), cluster(1, 20, 2)]))
    th.replay_labels.copy_(torch.arange(2).repeat_interleave(20))
    th.fit(two_class_head(), taught_x, taught_y, l2)
    return th


def answers(th: TaughtHead, x: torch.Tensor) -> torch.Tensor:
    head = two_class_head()
    logits = torch.cat([head(x), th.rows.logits(x)], 1)
    return torch.cat([torch.arange(2), th.rows.labels])[logits.argmax(-1)]


def test_a_taught_row_answers_its_new_class_and_leaves_the_old_classes_alone():
    th = fitted_head(cluster(2, 5, 3), torch.full((5,), 7))
    assert th.rows.labels.tolist() == [7]
    assert (answers(th, cluster(2, 50, 10)) == 7).float().mean() >= 0.95  # unseen examples of the new class
    for c in (0, 1):
        assert (answers(th, cluster(c, 50, 20 + c)) == c).all()


def test_a_correction_of_a_known_class_gets_its_own_row_for_that_label():
    # examples that look like nothing the head knows, labelled with a class it does know
    th = fitted_head(cluster(3, 5, 4), torch.full((5,), 1))
    assert th.rows.labels.tolist() == [1]
    assert (answers(th, cluster(3, 50, 11)) == 1).float().mean() >= 0.95
    assert (answers(th, cluster(0, 50, 12)) == 0).all()


def test_the_fit_is_a_function_of_its_inputs_alone():
    x = torch.cat([cluster(2, 4, 5), cluster(3, 6, 6)])
    y = torch.tensor([5] * 4 + [4] * 6)
    a, b = fitted_head(x, y), fitted_head(x.clone(), y.clone())
    assert a.rows.labels.tolist() == [4, 5]  # sorted: the same order in every process
    assert torch.equal(a.rows.weight, b.rows.weight) and torch.equal(a.rows.bias, b.rows.bias)


def test_no_taught_examples_and_unknown_norms_fit_no_rows():
    assert fitted_head(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64)).rows.labels.numel() == 0
    assert fitted_head(torch.zeros(3, D), torch.full((3,), 2)).rows.labels.numel() == 0  # norm 0 = unknown


def test_without_feedback_the_replay_changes_no_prediction(tiny_model):
    with_replay, without = tiny_model(replay_per_class=5), tiny_model(replay_per_class=0)
    assert with_replay.taught is not None and without.taught is None
    without.load_state_dict({k: v for k, v in with_replay.state_dict().items() if not k.startswith("taught.")})
    x = torch.randn(6, 1, 28, 28)
    feats = with_replay.embed(x)[0]
    with torch.no_grad():
        with_replay.memory.update(feats, torch.arange(6) % 4)
        without.memory.update(feats, torch.arange(6) % 4)
    a, b = with_replay.predict(x), without.predict(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.confidence, b.confidence) and a.paths == b.paths


def test_the_memory_gives_back_the_features_it_was_written_from(tiny_model):
    m = tiny_model(replay_per_class=5)
    x = 5 * torch.randn(4, m.key_dim)
    with torch.no_grad():
        rep = m.memory.teach(x, torch.tensor([0, 1, 2, 3]))
    assert torch.allclose(m.memory.features_of(rep.slot), x, atol=1e-5)


def test_the_runtime_fits_a_row_per_taught_label_and_forgetting_removes_it(tmp_path):
    from service.serving.runtime import ModelRuntime
    from tests.helpers import save_tiny_model
    from tests.test_runtime import teach

    save_tiny_model(tmp_path / "store", replay_per_class=3)
    a = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    b = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    try:
        teach(a, [1, 2, 3], "Novel")
        teach(a, [4], "one")
        assert a.memory_info()["taught_rows"] == ["one", "Novel"]  # label order: one is a head class
        b.sync()  # another process applying the same log reaches the same minimum
        assert same_minimum(a, b)
        a.forget(4)
        assert a.memory_info()["taught_rows"] == ["Novel"]
        a.snapshot()  # a process started from the snapshot reaches the same minimum
        c = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
        assert c.stats.restored_from_seq == a.applied_seq
        c.sync()
        assert same_minimum(a, c)
        c.close()
        off = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var2", {"taught_rows": False})
        teach(off, [5], "Novel")
        assert off.memory_info()["taught_rows"] == []
        off.close()
    finally:
        a.close()
        b.close()


def test_routing_policy_rejects_a_negative_taught_l2():
    import pytest
    with pytest.raises(ValueError, match="--taught-l2"):
        RoutingPolicy(taught_l2=-1)


def same_minimum(a, b) -> bool:
    """Two runtimes' converged rows: the same labels, weights within 1% of their scale (the
    fit stops at a gradient of FIT_GTOL: with l2 1e-4 that leaves ~FIT_GTOL / 2e-4 = 0.05 of
    play), and the same answers for the replay features and random features."""
    a.fitter.wait_converged()
    b.fitter.wait_converged()
    ra, rb = a.model.taught.rows, b.model.taught.rows
    probe = torch.cat([a.model.taught.replay_features, 3 * torch.randn(200, ra.weight.shape[1])])
    scale = 0.01 * max(ra.weight.abs().max(), ra.bias.abs().max())
    return (torch.equal(ra.labels, rb.labels) and (ra.weight - rb.weight).abs().max() <= scale
            and (ra.bias - rb.bias).abs().max() <= scale
            and torch.equal(ra.logits(probe).argmax(-1), rb.logits(probe).argmax(-1)))


def test_a_fit_continued_in_warm_steps_reaches_the_minimum_of_a_whole_fit():
    x = torch.cat([cluster(2, 4, 5), cluster(3, 6, 6)])
    y = torch.tensor([5] * 4 + [4] * 6)
    whole = fitted_head(x, y)
    stepped, steps = fitted_head(x[:4], y[:4]), 0  # rows for label 5 only, then both labels
    while not stepped.fit(two_class_head(), x, y, 1e-3, iterations=3, warm=True):
        steps += 1
    assert steps >= 2  # it was continued, not done in one go
    assert torch.equal(stepped.rows.labels, whole.rows.labels)
    # at a minimum of a strictly convex loss the gradient bounds the distance between the two
    assert torch.allclose(stepped.rows.weight, whole.rows.weight, atol=100 * FIT_GTOL / 1e-3)
    assert torch.equal(answers(stepped, cluster(2, 50, 30)), answers(whole, cluster(2, 50, 30)))


def test_a_warm_fit_starts_each_label_from_its_current_row_and_a_new_label_from_zero():
    th = fitted_head(torch.cat([cluster(2, 4, 5), cluster(3, 4, 6)]), torch.tensor([4] * 4 + [5] * 4))
    start = th._start(torch.tensor([5, 6]), D)  # label 4 has no examples left, 6 is new
    assert torch.equal(start[0, :D], th.rows.weight[1].double()) and start[0, D] == th.rows.bias[1].double()
    assert not start[1].any()


def test_a_request_waits_for_a_bounded_fit_and_the_fitter_finishes_it_to_the_minimum(tmp_path, monkeypatch):
    from service.serving import fitter
    from service.serving.runtime import ModelRuntime
    from tests.helpers import save_tiny_model
    from tests.test_runtime import teach

    monkeypatch.setattr(fitter, "STEP_ITERATIONS", 2)
    save_tiny_model(tmp_path / "store", replay_per_class=3)
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    try:
        teach(rt, [1, 2, 3], "Novel")
        assert rt.model.taught.rows.labels.numel() == 1  # the request's examples have their row
        rt.fitter.wait_converged()
        assert rt.fitter.steps >= 2  # 2 iterations were not enough: the thread went on
        with rt.lock:
            examples = rt.model.taught_examples((rt.slot_feedback != -1).nonzero().squeeze(1))
        whole = TaughtHead(rt.model.feature_dim, len(rt.model.taught.replay_labels))
        whole.load_state_dict(rt.model.taught.state_dict())
        assert whole.fit(rt.model.head, *examples, rt.policy.taught_l2)
        scale = 0.01 * whole.rows.weight.abs().max()
        assert (rt.model.taught.rows.weight - whole.rows.weight).abs().max() <= scale
    finally:
        rt.close()


def test_the_rest_of_a_fit_waits_until_the_memory_settled_unless_someone_waits_for_convergence(tmp_path, monkeypatch):
    import time

    from service.serving import fitter
    from service.serving.runtime import ModelRuntime
    from tests.helpers import save_tiny_model
    from tests.test_runtime import teach

    monkeypatch.setattr(fitter, "STEP_ITERATIONS", 2)
    monkeypatch.setattr(fitter, "SETTLE_SECONDS", 4.0)
    save_tiny_model(tmp_path / "store", replay_per_class=3)
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    try:
        teach(rt, [1, 2, 3], "Novel")  # the request waited for 2 iterations: not the minimum
        changed_at = rt.fitter._last_change
        assert rt.model.taught.rows.labels.numel() == 1 and not rt.fitter._converged
        deadline = time.monotonic() + 60
        while not rt.fitter._converged:  # nobody asks for convergence: the thread settles first
            assert time.monotonic() < deadline, "the fit never went on to the minimum once the memory was quiet"
            time.sleep(0.05)
        assert time.monotonic() - changed_at >= 4.0
        monkeypatch.setattr(fitter, "SETTLE_SECONDS", 600.0)
        teach(rt, [4, 5], "Novel")
        started = time.monotonic()
        rt.fitter.wait_converged()  # asked for: no settling
        assert rt.fitter._converged and time.monotonic() - started < 60.0
    finally:
        rt.close()
