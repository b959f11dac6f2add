"""The Open Inference Protocol v2 (REST) through a real client, tritonclient[http] from PyPI,
against a real server process serving the default model on real Fashion-MNIST images: its
answers are /predict's answers, and bad requests get the protocol's error with a 4xx."""

import base64
import gzip
import io
import json
import os
import signal

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from testkit.live import Server

pytestmark = pytest.mark.server

MODEL = "fashion-mnist"
MAX_FILES = 8
MAX_UPLOAD = 1_000_000


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("oip"), "protocol-token", MAX_FILES=str(MAX_FILES),
               MAX_UPLOAD_BYTES=str(MAX_UPLOAD)).start()
    yield s
    s.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def client(live):
    c = triton.InferenceServerClient(live.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def version(live):
    return httpx.get(live.url + "/readyz").json()["model_version"]


def pixels(pngs) -> np.ndarray:
    """(B, 28, 28) uint8: the PNGs' own pixels."""
    return np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("L")) for p in pngs])


def predict_answers(url, pngs):
    r = httpx.post(url + "/predict", files=[("file", ("x.png", p, "image/png")) for p in pngs], timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def bytes_input(pngs, binary=True):
    inp = triton.InferInput("image", [len(pngs)], "BYTES")
    if binary:  # tritonclient's default: the binary tensor data extension
        inp.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    else:  # JSON strings cannot carry raw bytes: base64 text
        inp.set_data_from_numpy(np.array([base64.b64encode(p).decode() for p in pngs], dtype=np.object_),
                                binary_data=False)
    return inp


def tensor_input(array, datatype, binary=True):
    inp = triton.InferInput("pixels", list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def outputs(binary):
    return [triton.InferRequestedOutput(n, binary_data=binary)
            for n in ("label", "label_index", "confidence", "path", "class_scores")]


def strings(array) -> list[str]:
    # tritonclient gives bytes for binary BYTES outputs and str for JSON ones
    return [s.decode() if isinstance(s, bytes) else s for s in array]


def assert_same_answers(result, expected):
    labels = strings(result.as_numpy("label"))
    paths = strings(result.as_numpy("path"))
    assert labels == [p["label"] for p in expected]
    assert paths == [p["path"] for p in expected]
    assert result.as_numpy("label_index").tolist() == [p["label_index"] for p in expected]
    assert result.as_numpy("label_index").dtype == np.int64
    assert result.as_numpy("confidence") == pytest.approx([p["confidence"] for p in expected], abs=1e-5)
    scores = result.as_numpy("class_scores")
    assert scores.shape == (len(expected), 10) and scores.dtype == np.float32 and np.isfinite(scores).all()


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


def test_server_metadata_names_the_server_and_the_binary_extension(client):
    md = client.get_server_metadata()
    assert md["name"] == "memory-classifier-service" and md["version"]
    assert md["extensions"] == ["binary_tensor_data"]


def test_model_metadata_gives_the_version_inputs_and_outputs(client, version):
    md = client.get_model_metadata(MODEL)
    assert md["name"] == MODEL and md["versions"] == [version] and md["platform"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in md["inputs"]} == \
        {("image", "BYTES", (-1,)), ("pixels", "UINT8", (-1, 1, 28, 28))}
    assert [(t["name"], t["datatype"]) for t in md["outputs"]] == [
        ("label", "BYTES"), ("label_index", "INT64"), ("confidence", "FP32"), ("path", "BYTES"),
        ("ood_score", "FP32"), ("abstained", "BOOL"), ("class_scores", "FP32")]
    assert md["outputs"][-1]["shape"] == [-1, 10]
    assert client.get_model_metadata(MODEL, model_version=version) == md


def test_server_and_model_report_ready(client, version):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, model_version=version)
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(MODEL, model_version="0000")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encoded_pngs_get_the_answers_predict_gives(live, client, images, binary):
    pngs = [data for data, _ in images[:6]]
    result = client.infer(MODEL, [bytes_input(pngs, binary)], outputs=None if binary else outputs(False))
    assert_same_answers(result, predict_answers(live.url, pngs))
    wire = result.get_response()["outputs"][0]  # binary asked, binary answered; JSON likewise
    assert ("binary_data_size" in wire.get("parameters", {})) == binary and ("data" in wire) != binary


def test_a_gzipped_request_is_inflated_but_never_past_the_upload_limit(live, client, images):
    pngs = [data for data, _ in images[30:33]]
    result = client.infer(MODEL, [bytes_input(pngs)], request_compression_algorithm="gzip")
    assert_same_answers(result, predict_answers(live.url, pngs))
    bomb = gzip.compress(b"{" + b" " * (2 * MAX_UPLOAD) + b"}")  # a few kB that inflate past the limit
    r = httpx.post(f"{live.url}/v2/models/{MODEL}/infer", content=bomb, headers={"content-encoding": "gzip"})
    # stopped sooner: past 20 times its size (and past what any valid request holds)
    assert r.status_code == 413 and "more than 20 times its" in r.json()["error"]
    text = gzip.compress(b'{"id": "' + base64.b64encode(os.urandom(900_000)) + b'"}')  # hardly compressed
    assert len(text) < MAX_UPLOAD
    r = httpx.post(f"{live.url}/v2/models/{MODEL}/infer", content=text, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]


@pytest.mark.parametrize("shape", ["BCHW", "BHW"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_get_the_answers_predict_gives(live, client, images, shape, binary):
    pngs = [data for data, _ in images[6:13]]
    array = pixels(pngs)
    if shape == "BCHW":
        array = array[:, None]
    result = client.infer(MODEL, [tensor_input(array, "UINT8", binary)], outputs=outputs(binary))
    assert_same_answers(result, predict_answers(live.url, pngs))


def test_fp32_pixels_in_0_1_get_the_answers_predict_gives(live, client, images):
    pngs = [data for data, _ in images[13:16]]
    array = (pixels(pngs)[:, None].astype(np.float32) / np.float32(255))
    result = client.infer(MODEL, [tensor_input(array, "FP32")])
    assert_same_answers(result, predict_answers(live.url, pngs))


def test_a_chosen_version_and_request_id_are_answered(client, images, version):
    result = client.infer(MODEL, [bytes_input([images[0][0]])], model_version=version, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == MODEL and response["model_version"] == version


def test_inference_counts_in_the_prediction_metrics(live, client, images):
    def total():
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(live.url + "/metrics").text)}
        return sum(s.value for s in fams["predictions"].samples if s.name == "predictions_total")
    before = total()
    client.infer(MODEL, [bytes_input([d for d, _ in images[20:23]])])
    assert total() == before + 3
    client.infer(MODEL, [tensor_input(pixels([d for d, _ in images[23:25]]), "UINT8")])
    assert total() == before + 5


def test_unknown_model_or_version_gets_404(client, images, version):
    e = refusal(lambda: client.infer("no-such-model", [bytes_input([images[0][0]])]))
    assert e.status() == "404" and "unknown model 'no-such-model'" in e.message()
    e = refusal(lambda: client.get_model_metadata(MODEL, model_version="0000"))
    assert e.status() == "404" and version in e.message()


GOOD = np.zeros((1, 1, 28, 28), np.uint8)
BAD_TENSORS = [
    ("height", np.zeros((1, 1, 27, 28), np.uint8), "UINT8", "must have shape [B, 1, 28, 28]"),
    ("channels", np.zeros((1, 3, 28, 28), np.uint8), "UINT8", "must have shape [B, 1, 28, 28]"),
    ("rank", np.zeros((28, 28), np.uint8), "UINT8", "must have shape"),
    ("empty batch", np.zeros((0, 1, 28, 28), np.uint8), "UINT8", "the batch (first dimension of the shape) is empty"),
    ("int32", np.zeros((1, 1, 28, 28), np.int32), "INT32", "must be UINT8 (0..255) or FP32 (0..1), not INT32"),
    ("fp64", np.zeros((1, 1, 28, 28), np.float64), "FP64", "not FP64"),
    ("fp32 over 1", np.full((1, 1, 28, 28), 2.0, np.float32), "FP32", "FP32 values must be finite pixels in 0..1"),
    ("fp32 nan", np.full((1, 1, 28, 28), np.nan, np.float32), "FP32", "FP32 values must be finite pixels in 0..1"),
]


# each case as binary data and as JSON, except NaN, which JSON cannot carry
BAD_CASES = [pytest.param(*case, binary, id=f"{case[0]}-{'binary' if binary else 'json'}")
             for case in BAD_TENSORS for binary in (True, False) if binary or case[0] != "fp32 nan"]


@pytest.mark.parametrize("name,array,datatype,message,binary", BAD_CASES)
def test_bad_pixel_shapes_and_dtypes_get_the_protocols_400(client, name, array, datatype, message, binary):
    e = refusal(lambda: client.infer(MODEL, [tensor_input(array, datatype, binary)]))
    assert e.status() == "400" and message in e.message(), e.message()


def test_bad_image_inputs_get_the_protocols_4xx(client):
    text = np.array([b"this is not an image"], dtype=np.object_)
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(text)
    e = refusal(lambda: client.infer(MODEL, [inp]))
    assert e.status() == "400" and "not an image" in e.message()

    as_pixels = triton.InferInput("image", [1, 1, 28, 28], "UINT8")
    as_pixels.set_data_from_numpy(GOOD)
    e = refusal(lambda: client.infer(MODEL, [as_pixels]))
    assert e.status() == "400" and "input 'image' must be BYTES" in e.message()

    other = triton.InferInput("input0", [1, 1, 28, 28], "UINT8")
    other.set_data_from_numpy(GOOD)
    e = refusal(lambda: client.infer(MODEL, [other]))
    assert e.status() == "400" and "unknown input 'input0'" in e.message()

    e = refusal(lambda: client.infer(MODEL, [tensor_input(GOOD, "UINT8"), bytes_input([b"x"])]))
    assert e.status() == "400" and "exactly one input" in e.message()

    e = refusal(lambda: client.infer(MODEL, [tensor_input(GOOD, "UINT8")],
                                     outputs=[triton.InferRequestedOutput("probabilities")]))
    assert e.status() == "400" and "unknown output 'probabilities'" in e.message()


def test_more_images_than_max_files_gets_413(client, images):
    e = refusal(lambda: client.infer(MODEL, [bytes_input([images[0][0]] * (MAX_FILES + 1))]))
    assert e.status() == "413" and f"at most {MAX_FILES} images" in e.message()


def test_malformed_requests_get_an_error_object(live):
    url = f"{live.url}/v2/models/{MODEL}/infer"
    cases = [
        (b"", 400, "empty"),
        (b"{not json", 400, "invalid inference request"),
        (b'{"inputs": []}', 400, "inputs"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [1, 2]}]}', 400,
         "holds 784 values, the data 2"),
        (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                                 "data": [300] + [0] * 783}]}).encode(), 400, "UINT8 values must be 0..255"),
        (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                                 "data": [0.5] * 784}]}).encode(), 400, "UINT8 data must be integers"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}', 400,
         "not valid base64"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}', 400, "base64 string"),
        (b'{"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]}', 400, "shape"),
    ]
    for body, status, words in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and list(r.json()) == ["error"] and words in r.json()["error"], r.text
    over = httpx.post(url, content=b"x" * (MAX_UPLOAD + 1))
    assert over.status_code == 413 and "error" in over.json()
    binary = httpx.post(url, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "99"})
    assert binary.status_code == 400 and "Inference-Header-Content-Length" in binary.json()["error"]
    r = httpx.get(f"{live.url}/v2/models/no-such-model")
    assert r.status_code == 404 and list(r.json()) == ["error"]
