import pytest
import torch
import torch.nn.functional as F

from service.core.memory import ADDED, EMPTY, MEMORIES, REPLACED, SKIPPED, create_memory

KINDS = sorted(MEMORIES)


def make(kind, capacity=4, dim=3, classes=3, sim_threshold=0.9, **kw):
    return create_memory(kind, capacity=capacity, feature_dim=dim, num_classes=classes,
                         similarity_threshold=sim_threshold, **kw)


def onehot_vec(i, dim=3):
    return F.one_hot(torch.tensor(i), dim).float()


def test_factory_names_valid_choices():
    with pytest.raises(ValueError, match="cached.*trainable"):
        create_memory("nope", capacity=2, feature_dim=2, num_classes=2)


@pytest.mark.parametrize("bad", [dict(capacity=0), dict(temperature=0.0),
                                 dict(similarity_threshold=1.5)])
def test_config_rejects_bad_values(bad):
    args = dict(capacity=2, feature_dim=2, num_classes=2) | bad
    with pytest.raises(ValueError, match="--|must"):
        create_memory("cached", **args)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_memory_retrieves_nothing(kind):
    m = make(kind)
    r = m.retrieve(torch.randn(5, 3))
    assert (r.labels == EMPTY).all()
    assert (r.confidence == 0).all()
    assert (r.slots == EMPTY).all()
    assert m.size == 0 and m.class_counts().sum() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_fills_in_order_then_never_exceeds_capacity(kind):
    m = make(kind, capacity=4)
    rep = m.update(torch.randn(3, 3), torch.tensor([0, 1, 2]))
    assert rep.action.tolist() == [ADDED] * 3 and rep.slot.tolist() == [0, 1, 2]
    for _ in range(20):
        m.update(torch.randn(7, 3), torch.randint(0, 3, (7,)))
        assert m.size <= m.capacity
        assert int(m.class_counts().sum()) == m.size
        r = m.retrieve(torch.randn(4, 3), k=4)
        assert ((r.slots == EMPTY) | m.filled()[r.slots.clamp_min(0)]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_empty_slots_never_returned(kind):
    m = make(kind, capacity=10)
    m.update(torch.randn(2, 3), torch.tensor([0, 1]))
    r = m.retrieve(torch.randn(3, 3), k=5)
    assert set(r.slots[:, :2].flatten().tolist()) <= {0, 1}
    assert (r.slots[:, 2:] == EMPTY).all()
    assert torch.isinf(r.similarity[:, 2:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_retrieval_finds_the_stored_item_with_full_confidence(kind):
    m = make(kind, capacity=3)
    m.update(torch.stack([onehot_vec(0), onehot_vec(1), onehot_vec(2)]), torch.tensor([2, 0, 1]))
    r = m.retrieve(torch.stack([onehot_vec(1) * 5, onehot_vec(2) * 0.1]))  # scale does not matter
    assert r.labels.tolist() == [0, 1]
    assert r.slots[:, 0].tolist() == [1, 2]
    assert torch.allclose(r.similarity[:, 0], torch.ones(2))
    assert torch.allclose(r.confidence, torch.ones(2))


@pytest.mark.parametrize("kind", KINDS)
def test_confidence_scales_with_distance(kind):
    m = make(kind, capacity=2, dim=2, classes=2)
    m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    near = m.retrieve(torch.tensor([[1.0, 0.1]])).confidence
    far = m.retrieve(torch.tensor([[1.0, 0.9]])).confidence
    assert 0 <= far < near < 1


def test_cached_full_skips_similar_examples():
    m = make("cached", capacity=2, sim_threshold=0.9)
    m.update(torch.stack([onehot_vec(0), onehot_vec(1)]), torch.tensor([0, 1]))
    rep = m.update(torch.tensor([[1.0, 0.05, 0.0]]), torch.tensor([0]))  # cos ~0.999 >= 0.9
    assert rep.action.tolist() == [SKIPPED] and rep.slot.tolist() == [EMPTY]
    assert m.replacements == 0


def test_cached_replaces_least_similar_slot_of_its_class():
    m = make("cached", capacity=3, dim=3, sim_threshold=0.99)
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    m.update(keys, torch.tensor([0, 0, 1]))
    # closer to slot 0 than to slot 1, both class 0; slot 2 (class 1) is the least similar overall
    rep = m.update(torch.tensor([[0.9, 0.1, 0.1]]), torch.tensor([0]))
    assert rep.action.tolist() == [REPLACED]
    assert rep.slot.tolist() == [1] and rep.previous_label.tolist() == [0]
    assert m.labels.tolist() == [0, 0, 1]


def test_cached_without_its_class_replaces_least_similar_overall():
    m = make("cached", capacity=3, dim=3, sim_threshold=0.99)
    m.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7, 0.7, 0.0]]), torch.tensor([0, 1, 0]))
    rep = m.update(torch.tensor([[0.1, 0.9, 0.3]]), torch.tensor([2]))  # class 2 absent
    assert rep.slot.tolist() == [0] and rep.previous_label.tolist() == [0]
    assert m.labels.tolist() == [2, 1, 0]
    assert m.class_counts().tolist() == [1, 1, 1]


def test_cached_same_batch_never_writes_one_slot_twice():
    m = make("cached", capacity=3, dim=3, sim_threshold=0.99)
    m.update(torch.eye(3), torch.tensor([0, 0, 1]))
    # three class-0 examples that all find slot 1 least similar: they must take distinct slots
    q = torch.tensor([[1.0, 0.0, 0.2], [1.0, 0.0, 0.3], [1.0, 0.0, 0.25]])
    rep = m.update(q, torch.tensor([0, 0, 0]))
    written = rep.slot[rep.slot != EMPTY].tolist()
    assert len(written) == len(set(written)) == 3
    assert m.labels.tolist() == [0, 0, 0]


def test_cached_batch_of_a_class_replaces_its_slots_least_similar_to_any_of_its_examples():
    """The fixed-work rule (docs/memory.md): the batch's examples of a class replace the slots
    of that class ranked by their lowest similarity to any of them, the k-th example the k-th
    slot; an example of a class the memory lacks takes the least similar slot left overall."""
    g = torch.Generator().manual_seed(3)
    m = make("cached", capacity=10, dim=6, classes=3, sim_threshold=1.0)
    m.update(torch.randn(10, 6, generator=g), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1]))
    f, y = torch.randn(5, 6, generator=g), torch.tensor([0, 1, 0, 2, 0])
    sims = m.similarity(f)  # (5, 10)
    zero_slots = torch.arange(6)
    lowest = sims[[0, 2, 4]][:, zero_slots].min(0).values  # each class-0 slot's lowest similarity
    expect0 = zero_slots[lowest.argsort()[:3]].tolist()
    expect1 = 6 + int(sims[1, 6:].argmin())
    left = [s for s in range(10) if s not in expect0 + [expect1]]
    expect2 = left[int(sims[3, left].argmin())]
    counts = [6, 4, 1]
    counts[int(m.labels[expect2])] -= 1  # the class whose slot the class-2 example took
    rep = m.update(f, y)
    assert rep.slot.tolist() == [expect0[0], expect1, expect0[1], expect2, expect0[2]]
    assert rep.action.tolist() == [REPLACED] * 5
    assert m.labels[expect2].item() == 2 and m.class_counts().tolist() == counts


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_that_writes_nothing_leaves_the_state_as_it_was(kind):
    """Every row skipped: the fixed-size write sends them all to slot 0 with what it holds."""
    m = make(kind, capacity=3, sim_threshold=0.9)
    m.update(torch.eye(3), torch.tensor([0, 1, 2]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = m.update(torch.eye(3) * 2, torch.tensor([2, 0, 1]))  # exact duplicates: skipped
    assert rep.action.tolist() == [SKIPPED] * 3
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_rows_beside_a_write_leave_only_the_written_slot_changed(kind):
    m = make(kind, capacity=3, sim_threshold=0.9)
    m.update(torch.eye(3), torch.tensor([0, 1, 2]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 3.0]])  # duplicate, new, duplicate
    rep = m.update(q, torch.tensor([1, 1, 2]))
    assert rep.action.tolist() == [SKIPPED, REPLACED, SKIPPED]
    s = int(rep.slot[1])
    assert torch.allclose(F.normalize(m.keys[s].detach(), dim=0), q[1]) and m.labels[s] == 1
    assert int(m.written_at[s]) == 4 and int(m.writes) == 4 and int(m.replacements) == 1
    for k, v in m.state_dict().items():  # every other slot as it was
        if v.dim() and v.shape[0] == 3:
            rest = [i for i in range(3) if i != s]
            assert torch.equal(v[rest], before[k][rest]), k


def test_trainable_replaces_least_confident_slot():
    m = make("trainable", capacity=3, sim_threshold=0.99)
    m.update(torch.eye(3), torch.tensor([0, 1, 2]))
    with torch.no_grad():
        m.values[1] = torch.tensor([0.5, 0.4, 0.1])  # slot 1 has drifted: confidence 0.5
    assert m.slot_confidence().tolist() == pytest.approx([1.0, 0.5, 1.0])
    rep = m.update(torch.tensor([[0.5, 0.5, 0.7]]), torch.tensor([2]))
    assert rep.action.tolist() == [REPLACED] and rep.slot.tolist() == [1] and rep.previous_label.tolist() == [1]
    assert m.values[1].tolist() == [0.0, 0.0, 1.0]  # written one-hot


def test_trainable_ties_go_to_the_oldest_slot():
    m = make("trainable", capacity=3, sim_threshold=0.99)
    m.update(torch.eye(3)[[2]], torch.tensor([0]))
    m.update(torch.eye(3)[[0]], torch.tensor([1]))
    m.update(torch.eye(3)[[1]], torch.tensor([2]))
    rep = m.update(torch.tensor([[0.5, 0.5, 0.7], [0.7, 0.5, 0.5]]), torch.tensor([1, 1]))
    assert rep.slot.tolist() == [0, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_labels_out_of_range(kind):
    m = make(kind)
    with pytest.raises(ValueError, match="labels"):
        m.update(torch.randn(1, 3), torch.tensor([3]))
    assert m.size == 0


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    m = make(kind, capacity=5)
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    m2 = make(kind, capacity=5)
    m2.load_state_dict(m.state_dict())
    q = torch.randn(6, 3)
    a, b = m.retrieve(q), m2.retrieve(q)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.slots, b.slots)
    assert torch.allclose(a.confidence, b.confidence)
    assert m2.size == 4 and m2.writes == 4


def test_trainable_state_is_parameters_and_cached_is_buffers():
    t, c = make("trainable"), make("cached")
    assert {n for n, _ in t.named_parameters()} == {"keys", "values"}
    assert list(c.parameters()) == []
    assert {"keys", "labels"} <= set(c.state_dict())


# --- contrastive loss --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_on_empty_memory_is_finite_and_differentiable(kind):
    m = make(kind)
    f = torch.randn(4, 3, requires_grad=True)
    loss = m.contrastive_loss(f, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert f.grad is not None and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_with_batch_of_one_and_absent_classes(kind):
    m = make(kind, capacity=4)
    m.update(torch.randn(2, 3), torch.tensor([0, 1]))
    f = torch.randn(1, 3, requires_grad=True)
    one = m.contrastive_loss(f, torch.tensor([0]))
    one.backward()
    assert torch.isfinite(one) and one.item() > 0 and torch.isfinite(f.grad).all()
    g = torch.randn(2, 3, requires_grad=True)
    absent = m.contrastive_loss(g, torch.tensor([2, 2]))  # no item of class 2
    absent.backward()
    assert torch.isfinite(absent) and absent.item() == 0.0 and torch.isfinite(g.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_lower_when_query_sits_with_its_class(kind):
    m = make(kind, capacity=2, dim=2, classes=2)
    m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    good = m.contrastive_loss(torch.tensor([[1.0, 0.1]]), torch.tensor([0]))
    bad = m.contrastive_loss(torch.tensor([[1.0, 0.1]]), torch.tensor([1]))
    assert good < bad


def test_trainable_loss_trains_keys_and_values():
    m = make("trainable", capacity=4)
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    loss = m.contrastive_loss(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert m.keys.grad.abs().sum() > 0 and m.values.grad.abs().sum() > 0


# --- teach (feedback) --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_teach_is_never_skipped_for_a_different_label(kind):
    m = make(kind, capacity=2, sim_threshold=0.5)
    m.update(torch.stack([onehot_vec(0), onehot_vec(1)]), torch.tensor([0, 1]))
    near = torch.tensor([[1.0, 0.05, 0.0]])  # very similar to slot 0 (label 0)
    assert m.update(near, torch.tensor([2])).action.tolist() == [SKIPPED]  # training rule skips it
    rep = m.teach(near, torch.tensor([2]))
    assert rep.action.tolist() == [REPLACED]
    r = m.retrieve(near)
    assert r.labels.tolist() == [2] and r.confidence.item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_teach_exact_match_overwrites_or_skips(kind):
    m = make(kind, capacity=3)
    m.update(torch.stack([onehot_vec(0), onehot_vec(1)]), torch.tensor([0, 1]))
    same = m.teach(onehot_vec(1).unsqueeze(0), torch.tensor([1]))
    assert same.action.tolist() == [SKIPPED]
    other = m.teach(onehot_vec(1).unsqueeze(0), torch.tensor([2]))
    assert other.action.tolist() == [REPLACED] and other.slot.tolist() == [1] and other.previous_label.tolist() == [1]
    assert m.size == 2  # overwrote beside nothing: the empty slot stays free


@pytest.mark.parametrize("kind", KINDS)
def test_teach_fills_empty_slots_first(kind):
    m = make(kind, capacity=3)
    rep = m.teach(torch.randn(2, 3), torch.tensor([0, 1]))
    assert rep.action.tolist() == [ADDED, ADDED] and rep.slot.tolist() == [0, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_update_accept_a_precomputed_similarity(kind):
    a, b = make(kind, capacity=6), make(kind, capacity=6)
    first = torch.randn(6, 3)
    a.update(first, torch.tensor([0, 1, 2, 0, 1, 2]))
    b.update(first, torch.tensor([0, 1, 2, 0, 1, 2]))
    f, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 2])
    sims = a.similarity(f)
    assert torch.allclose(a.contrastive_loss(f, y, similarity=sims), b.contrastive_loss(f, y))
    ra, rb = a.update(f, y, similarity=sims), b.update(f, y)
    assert torch.equal(ra.slot, rb.slot) and torch.equal(a.labels, b.labels)


def test_loss_matches_its_definition_on_a_hand_made_memory():
    m = make("cached", capacity=3, dim=2, classes=2, temperature=0.5)
    m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), torch.tensor([0, 1, 1]))
    q = torch.tensor([[0.8, 0.6]])
    sims = torch.tensor([0.8, 0.6, 0.96])
    p = torch.softmax(sims / 0.5, -1)
    expected = -torch.log(p[1] + p[2])  # mass on class-1 items
    assert m.contrastive_loss(q, torch.tensor([1])).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_teach_keeps_every_example_of_a_new_class_when_taught_items_are_protected(kind):
    m = make(kind, capacity=8, dim=4, classes=4)
    m.update(F.normalize(torch.randn(8, 4), dim=-1), torch.tensor([0, 1] * 4))  # full of training items
    taught = torch.zeros(8, dtype=torch.bool)
    shots = F.normalize(torch.randn(3, 4), dim=-1)
    rep = m.teach(shots, torch.tensor([3, 3, 3]), protected=taught)
    assert len(set(rep.slot.tolist())) == 3 and (m.labels == 3).sum() == 3
    unprotected = make(kind, capacity=8, dim=4, classes=4)
    unprotected.update(F.normalize(torch.randn(8, 4), dim=-1), torch.tensor([0, 1] * 4))
    for shot in shots:  # one call each, nothing protected
        unprotected.teach(shot[None], torch.tensor([3]))
    if kind == "cached":  # the same-class rule alone rewrites the first shot with the next
        assert (unprotected.labels == 3).sum() == 1


def test_teach_with_every_slot_protected_still_writes():
    m = make("cached", capacity=2, dim=4, classes=4)
    m.teach(F.normalize(torch.randn(3, 4), dim=-1), torch.tensor([1, 2, 3]), protected=torch.ones(2, dtype=torch.bool))
    assert m.size == 2 and 3 in m.labels.tolist()


def test_class_balance_lets_a_rare_class_outvote_a_common_one():
    m = make("cached", capacity=101, dim=2, classes=3)
    common = F.normalize(torch.tensor([[1.0, 0.0]]) + 0.01 * torch.randn(100, 2), dim=-1)
    m.update(common, torch.zeros(100, dtype=torch.int64))
    m.update(F.normalize(torch.tensor([[1.0, 0.2]]), dim=-1), torch.tensor([2]))  # one example of class 2
    q = F.normalize(torch.tensor([[1.0, 0.15]]), dim=-1)  # nearest is the rare item, then four common ones
    assert m.retrieve(q).labels.item() == 0  # plain vote: four common neighbours win
    r = m.retrieve(q, class_balance=1.0)
    assert r.labels.item() == 2 and r.class_scores[0, 2] > 0.5


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_held_per_class_follows_writes_forgets_and_loads(kind):
    g = torch.Generator().manual_seed(0)
    m = make(kind, capacity=20, dim=4, classes=3, sim_threshold=1.0)
    for step in range(12):
        m.update(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
        if step % 3 == 2:
            m.forget(torch.randint(0, 20, (3,), generator=g))  # may repeat a slot or hit an empty one
        truth = torch.bincount(m.labels[m.labels != EMPTY], minlength=3)
        assert m.class_counts().tolist() == truth.tolist() and m.size == int(truth.sum())
    fresh = make(kind, capacity=20, dim=4, classes=3, sim_threshold=1.0)
    fresh.load_state_dict(m.state_dict())
    assert fresh.class_counts().tolist() == m.class_counts().tolist()
    assert "held_per_class" not in m.state_dict()  # derived, not saved


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_a_consistent_read_gives_the_state_as_of_its_start_while_writes_go_on(kind):
    import threading

    from service.serving.consistent_read import ConsistentRead
    g = torch.Generator().manual_seed(1)
    m = make(kind, capacity=50, dim=4, classes=3, sim_threshold=1.0)
    m.update(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    lock = threading.RLock()
    with lock:
        before = {k: v.clone() for k, v in m.state_dict().items()}
        read = ConsistentRead(m, lock, rows=7)
    got: dict[str, list] = {}
    for i, (name, piece) in enumerate(read.pieces()):
        got.setdefault(name, []).append(piece)
        with lock:  # writes between the pieces: new slots, replacements, forgets
            m.update(torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
            if i % 4 == 0:
                m.forget(torch.tensor([i % 50]))
    assert m.before_write == []  # read to the end: no longer saving rows
    assert list(got) == list(m.state_layout())
    for name, pieces in got.items():
        assert torch.equal(torch.cat(pieces) if before[name].dim() else pieces[0], before[name]), name
    assert not torch.equal(m.state_dict()["labels"], before["labels"])  # the writes did happen


@pytest.mark.parametrize("kind", KINDS)
def test_teaching_a_batch_equals_teaching_its_examples_one_by_one(kind):
    torch.manual_seed(3)
    base = torch.randn(12, 3)
    batch = torch.cat([torch.randn(5, 3), base[2:3], torch.randn(2, 3)])  # one repeats a stored item
    batch = torch.cat([batch, batch[1:2]])  # and one repeats an earlier example of the batch
    labels = torch.tensor([0, 1, 4, 4, 2, 0, 3, 4, 1])
    a, b = make(kind, capacity=12, classes=6), make(kind, capacity=12, classes=6)
    for m in (a, b):
        m.update(base, torch.arange(12) % 3)
    protected_a, protected_b = torch.zeros(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)
    rep = a.teach(batch, labels, protected=protected_a)
    one = []
    for i in range(len(batch)):
        one.append(b.teach(batch[i:i + 1], labels[i:i + 1], protected=protected_b))
        if one[-1].slot[0] >= 0:
            protected_b[one[-1].slot[0]] = True  # what teach marks in its own copy as it goes
    assert rep.action.tolist() == [int(r.action[0]) for r in one]
    assert rep.slot.tolist() == [int(r.slot[0]) for r in one]
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_one_example_replaces_the_slot_the_batch_rule_would_give_it():
    m = make("cached", capacity=10, classes=6)
    m.update(torch.randn(10, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
    x = torch.randn(2, 3)
    sims = m.similarity(x)
    available = torch.ones(10, dtype=torch.bool)
    available[3] = False
    for label in (0, 2, 5):  # 5: a class the memory does not hold (the least similar slot overall)
        labels = torch.tensor([label, 1])
        general = m._choose_replacements(sims, labels, torch.tensor([True, False]), available)[:1]  # the sorts
        alone = m._choose_replacements(sims[:1], labels[:1], torch.tensor([True]), available)  # the fast path
        assert alone.tolist() == general.tolist() and alone.item() != 3
