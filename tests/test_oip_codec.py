"""The Open Inference Protocol's codec in-process, without a server: request bodies made by the
real client (tritonclient[http]'s own encoder) parse into the model's input, every bound and
check refuses with its error, answers decode with the client's own decoder; and the one error
table gives both APIs their statuses (the protocol's 400 where the REST API says 422)."""

import base64
import gzip
import json
import zlib

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from service.core.model import Prediction
from service.core.preprocess import ImageError, ImageTooLarge, UnsupportedImageFormat
from service.core.store import InputSpec
from service.serving.vocabulary import LabelError
from service.web.errors import (DOMAIN_ERRORS, ApiError, BodyTimeout, BodyTooLarge, domain_error_response,
                                protocol_error_response)
from service.web.oip_body import Limits, max_json_values
from service.web.oip_codec import encode_response, model_metadata, parse_request, prediction_tensors
from service.web.oip_schema import (HEADER_LENGTH, OUTPUTS, InferenceRequest, InferenceRequestTooLarge,
                                    InvalidInferenceRequest, UnsupportedContentEncoding)

SPEC = InputSpec(image_size=28, in_chans=1, mean=[0.5], std=[0.25])
RGB = InputSpec(image_size=8, in_chans=3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
LIMITS = Limits(max_files=4, max_upload_bytes=1_000_000)


def parse(body, header_length=None, encoding=None, spec=SPEC, limits=LIMITS):
    return parse_request(body, encoding, header_length, spec, limits)


def client_body(inputs, outputs=None, **kw) -> tuple[bytes, str | None]:
    """The body tritonclient sends, and its Inference-Header-Content-Length (None: all JSON)."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return body, None if json_size is None else str(json_size)


def pixels_input(array, datatype="UINT8", binary=True):
    inp = triton.InferInput("pixels", list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def image_input(files, binary=True):
    inp = triton.InferInput("image", [len(files)], "BYTES")
    values = files if binary else [base64.b64encode(f).decode() for f in files]
    inp.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return inp


def oip_json(inputs, **rest) -> bytes:
    return json.dumps({"inputs": inputs, **rest}).encode()


def refusal(kind, body, header_length=None, **kw) -> str:
    with pytest.raises(kind) as e:
        parse(body, header_length, **kw)
    assert type(e.value) is kind  # not a subclass: each has its own status
    return str(e.value)


# --- requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_become_the_models_normalised_batch(binary):
    a = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    parsed = parse(*client_body([pixels_input(a, binary=binary)]))
    assert parsed.files is None and parsed.pixels.shape == (3, 1, 28, 28) and parsed.pixels.dtype == torch.float32
    expected = (torch.from_numpy(a).float()[:, None] / 255 - 0.5) / 0.25
    assert torch.allclose(parsed.pixels, expected, atol=1e-6)
    assert parsed.parse_s > 0


def test_fp32_pixels_of_a_three_channel_model_are_normalised_per_channel():
    a = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    parsed = parse(*client_body([pixels_input(a, "FP32")]), spec=RGB)
    mean, std = torch.tensor(RGB.mean).view(1, 3, 1, 1), torch.tensor(RGB.std).view(1, 3, 1, 1)
    assert torch.allclose(parsed.pixels, (torch.from_numpy(a) - mean) / std, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_image_files_come_out_as_sent(binary):
    files = [b"\x89PNG first", b"", b"third \x00\xff"]
    parsed = parse(*client_body([image_input(files, binary)], request_id="r-1"))
    assert parsed.files == files and parsed.pixels is None and parsed.request.id == "r-1"


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                               (" GZip ", gzip.compress), ("identity", lambda b: b)])
def test_a_compressed_body_inflates(encoding, compress):
    body, length = client_body([image_input([b"x" * 5000, b"y"])])
    assert parse(compress(body), length, encoding).files == [b"x" * 5000, b"y"]


def test_an_unknown_or_broken_encoding_is_refused():
    body = oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}])
    assert "content encoding 'br' not accepted" in refusal(UnsupportedContentEncoding, body, encoding="br")
    assert "could not be inflated" in refusal(InvalidInferenceRequest, b"not gzip at all", encoding="gzip")
    cut = gzip.compress(body)[:-12]
    assert "ends inside the compressed stream" in refusal(InvalidInferenceRequest, cut, encoding="gzip")


def test_a_compression_bomb_stops_at_its_bound():
    bomb = gzip.compress(b"{" + b" " * 5_000_000 + b"}", 9)  # ~5 kB
    assert "more than 20 times its" in refusal(InferenceRequestTooLarge, bomb, encoding="gzip")
    # hardly compressible text past the upload limit: stopped at the limit
    text = gzip.compress(b'{"id": "' + base64.b64encode(np.random.default_rng(2).bytes(60_000)) + b'"}')
    small = Limits(max_files=4, max_upload_bytes=50_000)
    assert "upload limit of 50000 bytes" in refusal(InferenceRequestTooLarge, text, encoding="gzip", limits=small)


def test_json_is_held_to_its_bounds_before_it_is_parsed():
    most = max_json_values(SPEC, LIMITS)
    lists = b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":[' + b"[]," * most + b"[]]}]}"
    assert f"more than {most} values" in refusal(InvalidInferenceRequest, lists)
    assert f"more than {most} values" in refusal(InvalidInferenceRequest, gzip.compress(lists), encoding="gzip")
    digits = b'{"inputs":[{"name":"pixels","shape":[1,28,28],"datatype":"UINT8","data":[' + b"9" * 30 + b"]}]}"
    assert "integer of more than 20 digits" in refusal(InvalidInferenceRequest, digits)
    # the binary data after the JSON part is not JSON: not held to the JSON bounds
    many = np.full((4, 28, 28), 44, np.uint8)  # bytes of "," in the binary part
    assert parse(*client_body([pixels_input(many)])).pixels.shape == (4, 1, 28, 28)


def test_the_declared_batch_is_checked_before_the_data():
    for inp in ({"name": "pixels", "shape": [2 ** 62, 1, 28, 28], "datatype": "UINT8", "data": [0]},
                {"name": "image", "shape": [5], "datatype": "BYTES", "data": ["eA=="] * 5}):
        assert "at most 4 images per request" in refusal(InferenceRequestTooLarge, oip_json([inp]))
    # no more elements are read than the shape declares
    zero_length = b"\x00\x00\x00\x00" * 100_000
    header = oip_json([{"name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(zero_length)}}])
    message = refusal(InvalidInferenceRequest, header + zero_length, header_length=str(len(header)))
    assert "holds 1 images, the data more than 1" in message


GOOD = np.zeros((1, 1, 28, 28), np.uint8)
BAD_PIXELS = [
    (np.zeros((1, 1, 27, 28), np.uint8), "UINT8", "must have shape [B, 1, 28, 28] or [B, 28, 28] for this model"),
    (np.zeros((1, 3, 28, 28), np.uint8), "UINT8", "must have shape [B, 1, 28, 28]"),
    (np.zeros((28, 28), np.uint8), "UINT8", "must have shape"),
    (np.zeros((0, 1, 28, 28), np.uint8), "UINT8", "the batch (first dimension of the shape) is empty"),
    (np.zeros((1, 1, 28, 28), np.int32), "INT32", "must be UINT8 (0..255) or FP32 (0..1), not INT32"),
    (np.full((1, 1, 28, 28), 2.0, np.float32), "FP32", "FP32 values must be finite pixels in 0..1"),
    (np.full((1, 1, 28, 28), -0.5, np.float32), "FP32", "FP32 values must be finite pixels in 0..1"),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("array,datatype,message", BAD_PIXELS, ids=[m[:30] + d for _, d, m in BAD_PIXELS])
def test_bad_pixels_are_refused_naming_what_the_model_takes(array, datatype, message, binary):
    assert message in refusal(InvalidInferenceRequest, *client_body([pixels_input(array, datatype, binary)]))


def test_nan_pixels_are_refused():
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    assert "finite pixels" in refusal(InvalidInferenceRequest, *client_body([pixels_input(nan, "FP32")]))


def pixels_json(data, datatype="UINT8", shape=(1, 28, 28)) -> bytes:
    return oip_json([{"name": "pixels", "shape": list(shape), "datatype": datatype, "data": data}])


@pytest.mark.parametrize("body,words", [
    (b"", "the request body is empty"),
    (b"{not json", "invalid inference request"),
    (b'{"inputs": []}', "inputs"),
    (pixels_json([1, 2]), "holds 784 values, the data 2"),
    (pixels_json([[1] * 784, [2]]), "holds 784 values, the data more than 784"),
    (pixels_json([300] + [0] * 783), "UINT8 values must be 0..255"),
    (pixels_json([-1] + [0] * 783), "UINT8 values must be 0..255"),
    (pixels_json([2 ** 64] + [0] * 783), "UINT8 values must be 0..255"),
    (pixels_json([0.5] * 784), "UINT8 data must be integers"),
    (pixels_json(["0"] * 784, "FP32"), "FP32 data must be numbers"),
    (pixels_json(None), "input 'pixels' has neither data nor binary_data_size"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]), "not valid base64"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]), "base64 string"),
    (oip_json([{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]), "shape"),
    (oip_json([{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["", ""]}]), "[B] or [B, 1]"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1]}]), "must be BYTES"),
    (oip_json([{"name": "input0", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]), "unknown input 'input0'"),
    (oip_json([{"name": "i" * 1000, "shape": [1], "datatype": "BYTES", "data": []}]), "unknown input 'iiii"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}] * 2), "exactly one input"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="],
                "parameters": {"shared_memory_region": "r"}}]), "shared-memory extension is not supported"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
              outputs=[{"name": "probabilities"}]), "unknown output 'probabilities'"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
              outputs=[{"name": "label", "parameters": {"classification": 3}}]), "parameter 'classification'"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="],
                "parameters": {"binary_data_size": 0}}]), "give either data or binary_data_size"),
    (oip_json([{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}]),
     "runs past the 0 bytes of binary data"),
])
def test_bad_requests_are_refused_saying_what_is_wrong(body, words):
    message = refusal(InvalidInferenceRequest, body)
    assert words in message and len(message) < 600, message


def test_the_binary_part_must_match_the_header_length_and_the_sizes():
    body, length = client_body([image_input([b"abc"])])
    for bad in ("0", "-3", "abc", str(len(body) + 1)):
        assert HEADER_LENGTH in refusal(InvalidInferenceRequest, body, header_length=bad)
    assert "belong to no input" in refusal(InvalidInferenceRequest, body + b"extra", header_length=length)
    size = json.loads(body[:int(length)])["inputs"][0]["parameters"]["binary_data_size"]
    header = oip_json([{"name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": size}}])
    short = header + b"\x09\x00\x00\x00abc"  # an element declaring 9 bytes, with 3 left
    assert "element 0 declares 9 bytes" in refusal(InvalidInferenceRequest, short, header_length=str(len(header)))


# --- answers -------------------------------------------------------------------------------------
CLASSES = ["shirt", "shoe", "bag"]


def prediction() -> Prediction:
    scores = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0]])  # a 4th, not yet known, slot
    return Prediction(labels=torch.tensor([0, 2]), confidence=torch.tensor([0.7, 0.8]),
                      used_memory=torch.tensor([True, False]), class_scores=scores,
                      slot=torch.tensor([5, -1]), similarity=torch.tensor([0.9, 0.0]),
                      ood_score=torch.tensor([0.5, 9.0]), abstained=torch.tensor([False, True]),
                      timings_ms={"features": 1.0, "memory": 0.1, "head": 0.2})


def test_the_outputs_are_read_from_the_predictions_tensors():
    t = prediction_tensors(prediction(), CLASSES.__getitem__, len(CLASSES))
    assert list(t) == list(OUTPUTS)
    assert t["label"] == ("BYTES", [2], ["shirt", "bag"]) and t["path"] == ("BYTES", [2], ["memory", "abstain"])
    assert t["ood_score"].values.dtype == np.float32 and t["ood_score"].values.tolist() == [0.5, 9.0]
    assert t["abstained"].datatype == "BOOL" and t["abstained"].values.tolist() == [False, True]
    assert t["label_index"].values.dtype == np.int64 and t["label_index"].values.tolist() == [0, 2]
    assert t["confidence"].values.dtype == np.float32 and t["confidence"].values.tolist() == pytest.approx([0.7, 0.8])
    assert t["class_scores"].shape == [2, 3] and t["class_scores"].values.dtype == np.float32


def request(outputs=None, **parameters) -> InferenceRequest:
    return InferenceRequest(id="req-9", inputs=[{"name": "image", "shape": [1], "datatype": "BYTES"}],
                            outputs=outputs, parameters=parameters or None)


def client_result(encoded):
    length = encoded.headers.get(HEADER_LENGTH)
    return triton.InferenceServerClient.parse_response_body(encoded.body, header_length=None if length is None
                                                            else int(length))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_answer_decodes_with_the_clients_own_decoder(binary):
    tensors = prediction_tensors(prediction(), CLASSES.__getitem__, len(CLASSES))
    req = request(binary_data_output=True) if binary else request()
    encoded = encode_response(req, tensors, "fashion-mnist", "v7")
    assert encoded.media_type == ("application/octet-stream" if binary else "application/json")
    assert (HEADER_LENGTH in encoded.headers) == binary
    result = client_result(encoded)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("fashion-mnist", "v7", "req-9")
    assert [o["name"] for o in response["outputs"]] == list(OUTPUTS)
    assert [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("label")] == ["shirt", "bag"]
    assert result.as_numpy("label_index").tolist() == [0, 2] and result.as_numpy("label_index").dtype == np.int64
    assert result.as_numpy("confidence").tolist() == pytest.approx([0.7, 0.8])
    assert result.as_numpy("ood_score").tolist() == [0.5, 9.0]
    assert result.as_numpy("abstained").tolist() == [False, True]
    assert result.as_numpy("class_scores").shape == (2, 3)
    assert np.allclose(result.as_numpy("class_scores"), [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])


def test_only_the_outputs_asked_come_back_each_in_the_form_asked():
    tensors = prediction_tensors(prediction(), CLASSES.__getitem__, len(CLASSES))
    req = request(outputs=[{"name": "path", "parameters": {"binary_data": True}}, {"name": "confidence"}])
    result = client_result(encode_response(req, tensors, "m", "1"))
    wire = result.get_response()["outputs"]
    assert [o["name"] for o in wire] == ["path", "confidence"]
    assert "binary_data_size" in wire[0]["parameters"] and "data" in wire[1]
    assert [s.decode() for s in result.as_numpy("path")] == ["memory", "abstain"]


def test_model_metadata_names_the_inputs_of_the_models_size():
    md = model_metadata("cifar10", "v2", RGB, 10)
    assert (md.name, md.versions) == ("cifar10", ["v2"])
    assert [(t.name, t.datatype, t.shape) for t in md.inputs] == [("image", "BYTES", [-1]),
                                                                  ("pixels", "UINT8", [-1, 3, 8, 8])]
    assert md.outputs[-1].shape == [-1, 10]


# --- one error table, two forms --------------------------------------------------------------------
def answers(exc):
    rest, oip = domain_error_response(exc), protocol_error_response(exc)
    return (rest.status_code, json.loads(rest.body)), (oip.status_code, json.loads(oip.body))


def test_the_table_holds_no_rule_an_earlier_one_shadows():
    for i, earlier in enumerate(DOMAIN_ERRORS):
        for later in DOMAIN_ERRORS[i + 1:]:
            assert not issubclass(later.kind, earlier.kind), f"{later.kind.__name__} after {earlier.kind.__name__}"


def test_the_apis_differ_only_where_the_protocol_says_400_for_the_rest_apis_422():
    assert {(r.status, r.oip) for r in DOMAIN_ERRORS if r.status != r.oip} == {(422, 400)}


@pytest.mark.parametrize("exc,rest,oip", [
    (ImageError("not_an_image", "not an image (cannot identify)"), (422, "not_an_image"), 400),
    (ImageTooLarge("image_too_large", "too many pixels"), (413, "image_too_large"), 413),
    (UnsupportedImageFormat("unsupported_format", "ICO is not accepted"), (415, "unsupported_format"), 415),
    (LabelError("bad label"), (422, "invalid_label"), 400),
    (InvalidInferenceRequest("input 'pixels': no"), (422, "invalid_inference_request"), 400),
    (InferenceRequestTooLarge("at most 4 images"), (413, "request_too_large"), 413),
    (UnsupportedContentEncoding("content encoding 'br'"), (415, "unsupported_content_encoding"), 415),
])
def test_each_domain_error_gets_its_status_in_each_apis_form(exc, rest, oip):
    (rest_status, rest_body), (oip_status, oip_body) = answers(exc)
    assert (rest_status, rest_body["error"]) == rest and rest_body["detail"] == str(exc)
    assert oip_status == oip and oip_body == {"error": str(exc)}


def test_body_errors_and_the_web_layers_own_refusals_in_the_protocols_form():
    (_, rest), (status, oip) = answers(BodyTimeout("no part of the request body arrived for BODY_TIMEOUT (1 s)"))
    assert status == 408 and "BODY_TIMEOUT" in oip["error"] and rest["error"] == "body_timeout"
    assert protocol_error_response(BodyTimeout()).headers["connection"] == "close"
    (_, rest), (status, oip) = answers(BodyTooLarge())
    assert status == 413 and "upload limit" in oip["error"] and rest["detail"] == oip["error"]
    r = protocol_error_response(ApiError(404, "unknown_model", "unknown model 'x'"))
    assert r.status_code == 404 and json.loads(r.body) == {"error": "unknown model 'x'"}
    assert protocol_error_response(RuntimeError("a bug")) is None  # the app's handler logs it: 500


def test_a_model_without_an_ood_score_answers_null_in_json():
    p = prediction()
    p.ood_score = torch.full((2,), float("nan"))
    p.abstained = torch.zeros(2, dtype=torch.bool)
    encoded = encode_response(request(), prediction_tensors(p, CLASSES.__getitem__, len(CLASSES)), "m", "1")
    out = {o["name"]: o for o in json.loads(encoded.body)["outputs"]}
    assert out["ood_score"]["data"] == [None, None] and out["abstained"]["data"] == [False, False]
