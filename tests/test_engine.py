"""The openvino-int8 CPU inference engine (service/core/engine.py, docs/engine.md): a tiny
model trained for a few steps on synthetic data, quantised once (module fixture), then: keys
and answers close to eager, the manifest's record, the gate's refusal leaving the store as it
was, the store's checks of the engine's files, ENGINE=eager on an int8 model (its own keys and
version), feedback vectors kept per engine, and /memory and the inference protocol's metadata."""

import hashlib
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.cli import main as cli_main
from service.core import retrofit as retrofit_module
from service.core.data import carve_validation, normalize, validation_of
from service.core.engine import OPENVINO_INT8, EngineUnavailable, OpenVINOBackbone, load_engine_model
from service.core.model import ClassifierConfig
from service.core.preprocess import ImageLimits, decode_image
from service.core.retrofit import EngineRefused, retrofit_engine
from service.core.store import EAGER, ModelStoreError, load_model, read_manifest, served_version
from service.core.train import TrainConfig, run_training
from service.serving.runtime import ModelRuntime
from service.web.app import create_app
from service.web.settings import ServiceConfig
from tests.test_runtime import image, teach
from tests.test_train import synthetic

pytest.importorskip("nncf")  # the `test` extra installs it: quantising needs it, serving does not

NAME = "syn"


def state_of(d):
    """Every file of a model folder, name -> sha256."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def data():
    return synthetic(n=512)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A stored small_resnet trained one epoch on the synthetic corners, with a validation split."""
    store = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    tc = TrainConfig(name=NAME, store=str(store), epochs=1, batch_size=64, progress=False, precision="fp32",
                     flip=False, augment_pad=0, lr=0.1, validation_size=64)
    run_training(tc, ClassifierConfig(backbone="small_resnet", memory="cached", memory_size=128), ds=data)
    return store


@pytest.fixture(scope="module")
def engined(tmp_path_factory, trained, data):
    """The trained model's copy, retrofitted with the int8 engine: (store, report, manifest before)."""
    store = tmp_path_factory.mktemp("engined")
    shutil.copytree(trained / NAME, store / NAME)
    before = read_manifest(store / NAME)
    report = retrofit_engine(store, NAME, OPENVINO_INT8, calibration=128, seed=0, ds=data, speed_seconds=0.1,
                             log=lambda line: None)
    return store, report, before


@pytest.fixture
def store_copy(tmp_path, engined):
    shutil.copytree(engined[0] / NAME, tmp_path / "store" / NAME)
    return tmp_path / "store"


def validation_images(data, loaded):
    val = validation_of(data, loaded.manifest["data"])
    return normalize(val.images, loaded.input.mean, loaded.input.std), val.labels


def test_int8_features_and_memory_keys_are_close_to_eager_and_answers_mostly_equal(engined, data):
    store = engined[0]
    eager, int8 = load_engine_model(store, NAME, EAGER), load_engine_model(store, NAME, OPENVINO_INT8)
    assert isinstance(int8.model.backbone, OpenVINOBackbone) and not isinstance(eager.model.backbone,
                                                                                OpenVINOBackbone)
    x, labels = validation_images(data, eager)
    with torch.no_grad():
        fe, fq = eager.model.embed(x)[0], int8.model.embed(x)[0]
    assert fq.dtype == torch.float32 and fq.shape == fe.shape
    assert F.cosine_similarity(fe, fq).min() > 0.98
    # both memories hold the same training images' keys, slot for slot, each from its own network
    me, mq = eager.model.memory, int8.model.memory
    assert me.size == mq.size > 0 and torch.equal(me.labels, mq.labels)
    filled = me.filled()
    assert not torch.equal(me.keys[filled], mq.keys[filled])
    assert F.cosine_similarity(me.keys[filled], mq.keys[filled]).min() > 0.98
    pe, pq = eager.model.predict(x, eager.policy), int8.model.predict(x, int8.policy)
    assert (pe.labels == pq.labels).float().mean() >= 0.95
    assert (pq.labels == labels).float().mean() >= (pe.labels == labels).float().mean() - 0.05


def test_retrofit_records_engine_files_calibration_and_gate_in_a_new_version(engined):
    store, report, before = engined
    m = read_manifest(store / NAME)
    assert m["version"] != before["version"]
    e = m["engine"]
    assert e["name"] == OPENVINO_INT8 and set(e["files"]) == {"xml", "bin", "safetensors"}
    for fname in e["files"].values():  # listed with their sha256, so part of the version
        assert m["artifacts"][fname] == hashlib.sha256((store / NAME / fname).read_bytes()).hexdigest()
    assert e["calibration"] == {"images": 128, "seed": 0, "class_stratified": True,
                                "split": "training minus validation"}
    assert e["gate"]["passed"] and e["gate"]["drop_points"] <= e["gate"]["max_drop_points"] == 0.3
    assert e["gate"]["validation_images"] == 64 and e["gate"] == report.gate
    assert set(e["variants"]) == {EAGER, OPENVINO_INT8} and e["library"]["openvino"]
    # each variant's threshold was chosen on its own keys: the manifest's routing is eager's
    assert m["routing"]["confidence_threshold"] == e["variants"][EAGER]["confidence_threshold"]
    assert e["routing"]["confidence_threshold"] == e["variants"][OPENVINO_INT8]["confidence_threshold"]


def test_calibration_and_memory_images_come_from_training_not_validation(engined, data, monkeypatch):
    """The draws retrofit_engine makes (calibration, memory items) hold no validation image."""
    store = engined[0]
    loaded = load_model(store, NAME)
    record = loaded.manifest["data"]
    train, val, _ = carve_validation(data.train, record["validation_size"], record["validation_seed"])
    drawn = []
    real = retrofit_module.stratified_indices

    def spy(labels, n, seed):
        idx = real(labels, n, seed)
        drawn.append((len(labels), idx))
        return idx
    monkeypatch.setattr(retrofit_module, "stratified_indices", spy)
    monkeypatch.setattr(retrofit_module, "GATE_MAX_DROP", -100.0)  # refused at the end: nothing written
    with pytest.raises(EngineRefused):
        retrofit_engine(store, NAME, OPENVINO_INT8, calibration=32, ds=data, speed_seconds=0, log=lambda line: None)
    assert drawn and all(n == len(train.labels) for n, _ in drawn)  # drawn from the training split only
    val_rows = {tuple(v.flatten().tolist()) for v in val.images}
    for _, idx in drawn:
        assert not any(tuple(train.images[i].flatten().tolist()) in val_rows for i in idx.tolist())


def test_a_refused_engine_leaves_the_stored_model_unchanged_and_the_command_exits_3(trained, data, tmp_path,
                                                                                     monkeypatch, capsys):
    shutil.copytree(trained / NAME, tmp_path / NAME)
    before = state_of(tmp_path / NAME)
    monkeypatch.setattr(retrofit_module, "GATE_MAX_DROP", -100.0)  # the engine would have to gain 100 points
    monkeypatch.setattr(retrofit_module, "load_dataset", lambda name, data_dir=None: data)
    code = cli_main(["retrofit", "--store", str(tmp_path), "--name", NAME, "--engine", OPENVINO_INT8,
                     "--calibration", "64"])
    err = capsys.readouterr().err
    assert code == 3 and "refused" in err and "left as it was" in err
    assert state_of(tmp_path / NAME) == before


def test_engine_files_are_checked_by_sha256_and_a_tampered_bin_is_refused(store_copy):
    m = read_manifest(store_copy / NAME)
    assert load_engine_model(store_copy, NAME).engine == OPENVINO_INT8  # intact: loads
    path = store_copy / NAME / m["engine"]["files"]["bin"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="sha256 mismatch"):
        load_engine_model(store_copy, NAME, OPENVINO_INT8)
    assert load_engine_model(store_copy, NAME, EAGER).engine == EAGER  # eager does not read the engine's files


def test_a_tampered_engine_state_file_is_refused(store_copy):
    m = read_manifest(store_copy / NAME)
    path = store_copy / NAME / m["engine"]["files"]["safetensors"]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ModelStoreError, match="sha256 mismatch"):
        load_model(store_copy, NAME, keys_of=OPENVINO_INT8)


def test_engine_eager_on_an_int8_model_uses_the_eager_keys_and_another_version(store_copy, tmp_path):
    auto = ModelRuntime(store_copy, NAME, tmp_path / "var", engine="auto")
    eager = ModelRuntime(store_copy, NAME, tmp_path / "var", engine="eager")
    try:
        m = read_manifest(store_copy / NAME)
        assert (auto.engine, eager.engine) == (OPENVINO_INT8, EAGER)
        assert auto.version == served_version(m, OPENVINO_INT8) != eager.version == m["version"]
        stored_eager = load_model(store_copy, NAME).model.memory.keys
        stored_int8 = load_model(store_copy, NAME, keys_of=OPENVINO_INT8).model.memory.keys
        assert torch.equal(eager.memory.keys, stored_eager) and torch.equal(auto.memory.keys, stored_int8)
        assert auto.policy.confidence_threshold == m["engine"]["routing"]["confidence_threshold"]
        # snapshots are kept per served version: one engine's never restore another's memory
        assert auto.snapshots.folder != eager.snapshots.folder
    finally:
        auto.close()
        eager.close()


def test_feedback_vectors_of_one_engine_are_re_embedded_by_another(store_copy, tmp_path):
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    int8 = ModelRuntime(store_copy, NAME, tmp_path / "var", feedback_db=db, engine=OPENVINO_INT8)
    try:
        teach(int8, [1, 2], "c1")
        slots = (int8.slot_feedback != -1).nonzero().squeeze(1)
        taught_int8 = int8.memory.keys[slots[int8.slot_feedback[slots].argsort()]].clone()
    finally:
        int8.close()
    eager = ModelRuntime(store_copy, NAME, tmp_path / "var", feedback_db=db, engine=EAGER)
    try:
        assert eager.stats.reembedded == 2  # the int8 vectors were not read: eager embedded the images itself
        slots = (eager.slot_feedback != -1).nonzero().squeeze(1)
        slots = slots[eager.slot_feedback[slots].argsort()]  # in the order taught (feedback seq)
        assert len(slots) == 2 and not torch.equal(eager.memory.keys[slots], taught_int8)
        pngs = [image(s)[1] for s in (1, 2)]  # as the replica reads them back: decoded with the model's input spec
        x = torch.stack([decode_image(p, eager.loaded.input, ImageLimits()) for p in pngs])
        expected = F.normalize(eager.embed_batch(x), dim=-1)
        assert torch.allclose(eager.memory.keys[slots], expected, atol=1e-5)
    finally:
        eager.close()


def test_a_forget_on_the_int8_engine_rebuilds_from_the_int8_memory_not_the_eager_one(store_copy, tmp_path):
    rt = ModelRuntime(store_copy, NAME, tmp_path / "var", engine=OPENVINO_INT8)
    try:
        stored = load_model(store_copy, NAME, keys_of=OPENVINO_INT8).model.memory.keys
        assert torch.equal(rt.memory.keys, stored)
        result = teach(rt, [5], "c2")
        assert not torch.equal(rt.memory.keys, stored)
        assert rt.forget(result.outcomes[0].feedback_id)  # no snapshot: rebuilt from the stored memory
        assert torch.equal(rt.memory.keys, stored)
    finally:
        rt.close()


def test_an_engine_the_model_lacks_is_refused_with_the_command_that_makes_it(trained, tmp_path):
    with pytest.raises(ModelStoreError, match="retrofit --name syn --engine openvino-int8.*ENGINE=eager"):
        ModelRuntime(trained, NAME, tmp_path / "var", engine=OPENVINO_INT8)
    rt = ModelRuntime(trained, NAME, tmp_path / "var", engine="auto")  # auto without one: eager
    try:
        assert rt.engine == EAGER and rt.version == read_manifest(trained / NAME)["version"]
    finally:
        rt.close()


def test_without_openvino_an_int8_model_fails_at_start_naming_engine_eager(store_copy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(EngineUnavailable, match="ENGINE=eager"):
        ModelRuntime(store_copy, NAME, tmp_path / "var")
    rt = ModelRuntime(store_copy, NAME, tmp_path / "var", engine="eager")  # the way out works without it
    rt.close()


def test_memory_and_inference_protocol_metadata_show_the_engine(store_copy, tmp_path):
    for engine, expected in (("auto", OPENVINO_INT8), ("eager", EAGER)):
        cfg = ServiceConfig(model_store=str(store_copy), model_name=NAME, state_dir=str(tmp_path / "var"),
                            snapshot_interval=0, engine=engine)
        with TestClient(create_app(cfg)) as c:
            mem = c.get("/memory").json()
            meta = c.get(f"/v2/models/{NAME}").json()
            assert mem["engine"] == meta["engine"] == expected
            assert meta["versions"] == [mem["model_version"]]
            m = read_manifest(store_copy / NAME)
            assert mem["model_version"] == served_version(m, expected)
            r = c.post("/predict", files={"file": ("x.png", _png(), "image/png")})
            assert r.status_code == 200 and r.json()["model_version"] == mem["model_version"]


def _png():
    return image(3)[1]


def test_retrofit_manifest_is_plain_json_and_the_ir_is_xml(engined):
    """No pickle: the manifest is JSON, the network's graph XML, the state safetensors."""
    store = engined[0]
    m = json.loads((store / NAME / "manifest.json").read_bytes())
    files = m["engine"]["files"]
    assert (store / NAME / files["xml"]).read_bytes().lstrip().startswith(b"<?xml")
    assert (store / NAME / files["safetensors"]).read_bytes()[8:9] == b"{"  # safetensors: length, JSON header


def test_a_poolnet_engine_outputs_the_probe_beside_the_features_close_to_eager(engined):
    from service.core.backbones import PoolNet
    from service.core.engine import quantize_backbone

    torch.manual_seed(0)
    eager = PoolNet(1).eval()
    eager.whiten(torch.randn(256, 1, 28, 28))
    files = quantize_backbone(eager, torch.randn(64, 1, 28, 28))
    int8 = OpenVINOBackbone(files[".xml"], files[".bin"])
    assert int8.probe_dim == eager.probe_dim > 0
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        (fe, pe), (fq, pq) = eager.forward_with_probe(x), int8.forward_with_probe(x)
    assert F.cosine_similarity(fe, fq).min() > 0.98 and F.cosine_similarity(pe, pq).min() > 0.98
    assert torch.equal(int8(x), fq)  # forward: the features alone
    # a backbone without a probe (small_resnet) is exported with the features alone
    store = engined[0]
    assert load_engine_model(store, NAME, OPENVINO_INT8).model.backbone.probe_dim == 0
