"""CPU inference engines for the network, chosen by measurement (issue 23, item 2).

What is compared: the part of the classifier a CPU engine would run, the feature extractor
and the head (what `model.embed(images)` and the head compute: memory keys (B, D) and
head logits (B, classes)), for each shipped model in model_store/. The memory lookup stays in
torch and is not timed. Engines (those whose library is missing are skipped, with the reason):

    torch-fp32            eager fp32, weights and input channels-last (`for_inference`, today's service)
    torch-bf16-autocast   the same module under torch.autocast("cpu", bfloat16) (oneDNN bf16)
    torch-bf16            a copy with bf16 weights, channels-last, bf16 input
    torch-fp32-jit        fp32 traced, frozen, torch.jit.optimize_for_inference (oneDNN fusions)
    torch-int8-fx         torch.ao.quantization FX post-training static int8, "x86" backend
                          (per-channel weights, BN folded; fbgemm/oneDNN kernels, nothing compiled).
                          torch.ao.quantization is deprecated in favour of torchao; its PT2E flow
                          (X86InductorQuantizer) is no longer in torch 2.14 and needs torch.compile
                          (C++ compiled at run time) to run int8 kernels, so it is not measured
    ort-fp32              ONNX Runtime, the exported ONNX graph, all graph optimisations
    ort-int8              onnxruntime.quantization.quantize_static: QDQ, per-channel, U8 activations/S8 weights
    ov-fp32, ov-bf16      OpenVINO, INFERENCE_PRECISION_HINT f32 / bf16, on the same ONNX graph
    ov-int8               OpenVINO after NNCF post-training quantization (nncf.quantize, preset PERFORMANCE)

Int8 calibration reads TRAINING images only: --calibration images drawn (seeded, class-stratified)
from the training split minus the model's validation split (rebuilt from its manifest), never
validation or test images.

Measured per model, engine and batch size (--batches): model-only images/s on ONE core (the
process pins itself to --cpu, default core 0, and every engine runs one thread: torch
set_num_threads(1), ORT intra/inter-op threads 1, OpenVINO INFERENCE_NUM_THREADS 1), the same
normalised validation images for every engine, NCHW float32 as `normalize` gives them (each
engine's own layout/dtype conversion is inside the timing). Each repeat times enough calls for
about --repeat-seconds; engines are interleaved within each of the --repeats rounds (after a
warm-up), so machine noise hits them alike; the median is reported with its ratio to torch-fp32
of the same run. Then on the model's VALIDATION split: top-1 accuracy of the head's answer and
its delta to torch-fp32 (points), the share of images whose head label changes vs torch-fp32,
the max abs difference (and the least cosine similarity) of the memory keys vs torch-fp32, and
the routed accuracy (memory lookup + routing in torch on the engine's keys). An engine passes
the issue's gate when its validation accuracy is at most --max-drop points below torch-fp32;
the goal is >= 2x torch-fp32's images/s at batch 32 on both models. The engine chosen (`choose`:
passes the gate on every model, best worst-case ratio at batch 32; --test-engine overrides it)
then gets the one read of the test split, with torch-fp32 as reference.

    flock /tmp/cpu.lock .venv/bin/python -m bench.perf.cpu_engines [--models fashion-mnist cifar10] \
        [--batches 1 8 32] [--engines torch-fp32 ort-int8 ...] [--test-engine auto]

Needs `.venv/bin/pip install onnx onnxruntime openvino nncf` (not in requirements.txt; nncf only
quantizes, serving would need openvino alone). Exported and quantized files go to a temporary folder (or --work-dir, e.g. runs/cpu-engines);
never to model_store/. Record: bench/results/cpu-engines.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bench.harness import CIFAR_ZIP, header, spread, write_record
from service.core.data import carve_validation, load_dataset, normalize, stratified_indices, subset, validation_of
from service.core.store import load_model

DATA_DIRS = {"fashion-mnist": None, "cifar10": str(CIFAR_ZIP)}
ENGINES = ("torch-fp32", "torch-bf16-autocast", "torch-bf16", "torch-fp32-jit", "torch-int8-fx",
           "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")
BASE = "torch-fp32"
EVAL_BATCH = 32  # validation/test images per engine call (static shapes: 32 and the remainder)


class Net(nn.Module):
    """Feature extractor + head of an EnhancedClassifier whose memory reads the final features:
    images -> (memory keys (B, D), head logits (B, classes))."""

    def __init__(self, model):
        super().__init__()
        if model.exit_proj is not None:
            raise ValueError("cpu_engines measures models whose memory reads the final features (exit_stage final)")
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.backbone(x)
        return keys, self.head(keys)


# --- engines: build(net, calibration batches, work dir) -> run(x NCHW float32) -> (keys, logits) float32 torch ---
def torch_fp32(net, calib, work):
    net = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode():
            return net(x.contiguous(memory_format=torch.channels_last))
    return run, {}


def torch_bf16_autocast(net, calib, work):
    net = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            k, y = net(x.contiguous(memory_format=torch.channels_last))
        return k.float(), y.float()
    return run, {}


def torch_bf16(net, calib, work):
    net = copy.deepcopy(net).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode():
            k, y = net(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        return k.float(), y.float()
    return run, {}


def torch_fp32_jit(net, calib, work):
    net = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
    example = calib[0].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, example)))
        for _ in range(3):  # the profiling executor specialises on the first calls
            traced(example)

    def run(x):
        with torch.inference_mode():
            return traced(x.contiguous(memory_format=torch.channels_last))
    return run, {}


def torch_int8_fx(net, calib, work):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    example = (calib[0].contiguous(memory_format=torch.channels_last),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(net).eval(), get_default_qconfig_mapping("x86"), example)
        with torch.inference_mode():
            for xb in calib:
                prepared(xb.contiguous(memory_format=torch.channels_last))
        q = convert_fx(prepared).eval()

    def run(x):
        with torch.inference_mode():
            return q(x.contiguous(memory_format=torch.channels_last))
    return run, {"qconfig": "get_default_qconfig_mapping('x86')", "backend": "x86"}


def export_onnx(net, calib, work: Path) -> Path:
    path = work / "net-fp32.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(copy.deepcopy(net).eval(), (calib[0],), str(path), dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["keys", "logits"],
                              dynamic_axes={"images": {0: "batch"}, "keys": {0: "batch"}, "logits": {0: "batch"}})
    return path


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(x):
        k, y = sess.run(None, {"images": x.numpy()})
        return torch.from_numpy(k), torch.from_numpy(y)
    return run


def ort_fp32(net, calib, work):
    return ort_session(export_onnx(net, calib, work)), {}


def ort_int8(net, calib, work):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = export_onnx(net, calib, work)
    pre, out = work / "net-fp32-pre.onnx", work / "net-int8-qdq.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            xb = next(self.it, None)
            return None if xb is None else {"images": xb.numpy()}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return ort_session(out), {"quant_format": "QDQ", "per_channel": True, "activations": "QUInt8",
                              "weights": "QInt8", "calibrate_method": "MinMax"}


def ov_compiled(model, precision: str):
    """run(x) on an OpenVINO model, one compiled static-shape copy per batch size."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY"}
    requests: dict[tuple, object] = {}

    def run(x):
        shape = tuple(x.shape)
        req = requests.get(shape)
        if req is None:
            m = model.clone()
            m.reshape({m.inputs[0]: list(shape)})
            req = requests[shape] = core.compile_model(m, "CPU", config).create_infer_request()
        out = req.infer({0: x.numpy()})
        k, y = (torch.from_numpy(np.array(v, copy=True)) for v in out.to_tuple())
        return k, y
    return run


def ov_model(net, calib, work):
    import openvino as ov

    return ov.Core().read_model(str(export_onnx(net, calib, work)))


def ov_fp32(net, calib, work):
    return ov_compiled(ov_model(net, calib, work), "f32"), {"INFERENCE_PRECISION_HINT": "f32"}


def ov_bf16(net, calib, work):
    return ov_compiled(ov_model(net, calib, work), "bf16"), {"INFERENCE_PRECISION_HINT": "bf16"}


def ov_int8(net, calib, work):
    import nncf
    import openvino as ov

    m = ov_model(net, calib, work)
    q = nncf.quantize(m, nncf.Dataset([xb.numpy() for xb in calib]), preset=nncf.QuantizationPreset.PERFORMANCE,
                      subset_size=len(calib))
    ov.save_model(q, str(work / "net-int8-nncf.xml"))
    return ov_compiled(q, "f32"), {"nncf_preset": "PERFORMANCE", "non_int8_precision": "f32"}


BUILDERS = {"torch-fp32": torch_fp32, "torch-bf16-autocast": torch_bf16_autocast, "torch-bf16": torch_bf16,
            "torch-fp32-jit": torch_fp32_jit, "torch-int8-fx": torch_int8_fx, "ort-fp32": ort_fp32,
            "ort-int8": ort_int8, "ov-fp32": ov_fp32, "ov-bf16": ov_bf16, "ov-int8": ov_int8}


# --- measurement --------------------------------------------------------------------------------
def outputs(run, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, logits) of all of x, in calls of EVAL_BATCH images."""
    ks, ys = [], []
    for i in range(0, len(x), EVAL_BATCH):
        k, y = run(x[i:i + EVAL_BATCH].contiguous())
        ks.append(k.float().clone())
        ys.append(y.float().clone())
    return torch.cat(ks), torch.cat(ys)


def throughput(runs: dict, x: torch.Tensor, batches: list[int], repeats: int, repeat_s: float, warmup_s: float
               ) -> dict:
    """{engine: {batch: images/s spread}}, engines interleaved within each repeat round."""
    out: dict[str, dict] = {e: {} for e in runs}
    for B in batches:
        xb = x[:B].contiguous()
        calls = {}
        for e, run in runs.items():  # warm-up, and how many calls make a repeat of about repeat_s
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < warmup_s:
                run(xb)
                n += 1
            calls[e] = max(1, round(repeat_s / ((time.perf_counter() - t0) / n)))
        rates: dict[str, list[float]] = {e: [] for e in runs}
        for _ in range(repeats):
            for e, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(calls[e]):
                    run(xb)
                rates[e].append(calls[e] * B / (time.perf_counter() - t0))
        for e in runs:
            out[e][str(B)] = spread(rates[e]) | {"calls_per_repeat": calls[e]}
    return out


def head_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def routed_accuracy(model, keys: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the model's routed answer (memory lookup + routing + head in torch) on these keys."""
    right = 0
    for i in range(0, len(keys), 500):
        k = keys[i:i + 500]
        p = model.finish(model.retrieve(k, model.policy), k, model.policy)
        right += int((p.labels == labels[i:i + 500]).sum())
    return right / len(keys)


def measure_model(name: str, args, work: Path) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    loaded = load_model(args.store, name)
    model = loaded.model.for_inference()  # as the service runs it (channels-last weights)
    record = loaded.manifest["data"]
    ds = load_dataset(record["dataset"], DATA_DIRS.get(record["dataset"]))
    val = validation_of(ds, record)
    train, _, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    calib_idx = stratified_indices(train.labels, args.calibration, args.seed)
    mean, std = loaded.input.mean, loaded.input.std
    calib_x = normalize(subset(train, calib_idx).images, mean, std)
    calib = [calib_x[i:i + EVAL_BATCH].contiguous() for i in range(0, len(calib_x), EVAL_BATCH)]
    if args.val_limit:
        val = subset(val, torch.arange(min(args.val_limit, len(val.labels))))
    xv = normalize(val.images, mean, std).contiguous()
    print(f"\n== {name}: {loaded.manifest['classifier']['backbone']} {tuple(xv.shape[1:])}, "
          f"{len(val.labels)} validation images, {len(calib_x)} calibration images (training split); "
          f"data {time.perf_counter() - t0:.1f} s", flush=True)
    net = Net(model).eval()
    mwork = work / name
    mwork.mkdir(parents=True, exist_ok=True)
    runs, engines = {}, {}
    for e in args.engines:
        t = time.perf_counter()
        try:
            run, notes = BUILDERS[e](net, calib, mwork)
            run(xv[:2].contiguous())
        except Exception as exc:  # noqa: BLE001 - a missing library or an unsupported op: record and go on
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            print(f"  {e:20s} skipped: {msg}", flush=True)
            engines[e] = {"skipped": msg}
            continue
        runs[e] = run
        engines[e] = {"build_s": time.perf_counter() - t, **({"settings": notes} if notes else {})}
        print(f"  {e:20s} built in {engines[e]['build_s']:.1f} s", flush=True)
    if BASE not in runs:
        raise SystemExit(f"{BASE} is the reference: keep it in --engines")
    # accuracy on the validation split, against torch-fp32
    ref_k, ref_y = outputs(runs[BASE], xv)
    ref_acc, ref_labels = head_accuracy(ref_y, val.labels), ref_y.argmax(-1)
    for e, run in runs.items():
        k, y = (ref_k, ref_y) if e == BASE else outputs(run, xv)
        acc = head_accuracy(y, val.labels)
        cos = torch.nn.functional.cosine_similarity(k, ref_k, dim=1)
        engines[e]["validation"] = {
            "head_accuracy": acc, "delta_points": 100 * (acc - ref_acc),
            "label_changes": float((y.argmax(-1) != ref_labels).float().mean()),
            "keys_max_abs_diff": float((k - ref_k).abs().max()),
            "keys_max_abs": float(ref_k.abs().max()),
            "keys_min_cosine": float(cos.min()),
            "logits_max_abs_diff": float((y - ref_y).abs().max()),
            "routed_accuracy": routed_accuracy(model, k, val.labels),
        }
        engines[e]["passes_gate"] = 100 * (acc - ref_acc) >= -args.max_drop
    # throughput, interleaved
    rates = throughput(runs, xv, args.batches, args.repeats, args.repeat_seconds, args.warmup_seconds)
    for e in runs:
        engines[e]["images_per_s"] = rates[e]
        for B in map(str, args.batches):
            rates[e][B]["ratio_to_fp32"] = rates[e][B]["median"] / rates[BASE][B]["median"]
    print_table(name, engines, args.batches)
    result = {"backbone": loaded.manifest["classifier"]["backbone"], "input": list(xv.shape[1:]),
              "validation_images": len(val.labels), "calibration_images": len(calib_x),
              "manifest_val_accuracy": loaded.manifest["metrics"].get("val_accuracy"), "engines": engines}
    return result, {"runs": runs, "model": model, "test": ds.test, "mean": mean, "std": std}


def choose(results: dict, engines: list[str], batch: int) -> tuple[str | None, dict]:
    """The engine for the service: among those passing the gate on every model, the one whose
    worst ratio to torch-fp32 at `batch` over the models is highest (validation and timing only)."""
    table = {}
    for e in engines:
        per = [r["engines"].get(e, {}) for r in results.values()]
        if all("images_per_s" in p for p in per):
            table[e] = {"passes_gate_all": all(p["passes_gate"] for p in per),
                        f"ratio_b{batch}": {n: p["images_per_s"][str(batch)]["ratio_to_fp32"]
                                            for n, p in zip(results, per)}}
            table[e][f"min_ratio_b{batch}"] = min(table[e][f"ratio_b{batch}"].values())
            table[e]["meets_2x_all"] = table[e][f"min_ratio_b{batch}"] >= 2
    ok = [e for e, v in table.items() if v["passes_gate_all"] and e != BASE]
    return (max(ok, key=lambda e: table[e][f"min_ratio_b{batch}"]) if ok else None), table


@torch.no_grad()
def test_read(name: str, ctx: dict, engine: str) -> dict:
    """The final read on the test split, once, for the chosen engine (and torch-fp32 as reference)."""
    xt = normalize(ctx["test"].images, ctx["mean"], ctx["std"]).contiguous()
    out = {}
    for e in dict.fromkeys([BASE, engine]):
        k, y = outputs(ctx["runs"][e], xt)
        out[e] = {"head_accuracy": head_accuracy(y, ctx["test"].labels),
                  "routed_accuracy": routed_accuracy(ctx["model"], k, ctx["test"].labels)}
        print(f"  {name} test split ({len(xt)} images), {e}: head {100 * out[e]['head_accuracy']:.2f} %, "
              f"routed {100 * out[e]['routed_accuracy']:.2f} %", flush=True)
    return out


def print_table(name: str, engines: dict, batches: list[int]) -> None:
    cols = "".join(f"  b{B:<3d} img/s  (x fp32)" for B in batches)
    print(f"\n{name}: engine{' ' * 15}{cols}   val acc  delta  changed  keys max diff  gate")
    for e, v in engines.items():
        if "skipped" in v:
            print(f"  {e:22s} skipped: {v['skipped']}")
            continue
        r, a = v["images_per_s"], v["validation"]
        line = "".join(f"  {r[str(B)]['median']:9.0f} ({r[str(B)]['ratio_to_fp32']:4.2f}x)    " for B in batches)
        gate = "pass" if v["passes_gate"] else "FAIL"
        print(f"  {e:22s}{line}{100 * a['head_accuracy']:7.2f} {a['delta_points']:+6.2f} "
              f"{100 * a['label_changes']:6.2f} % {a['keys_max_abs_diff']:11.4f}   {gate}")


def versions() -> dict:
    out = {}
    for mod in ("numpy", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed
            out[mod] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fashion-mnist", "cifar10"])
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per engine and batch (median reported)")
    ap.add_argument("--repeat-seconds", type=float, default=0.3, help="about this long per timed repeat")
    ap.add_argument("--warmup-seconds", type=float, default=0.5)
    ap.add_argument("--calibration", type=int, default=1024, help="training images that calibrate int8")
    ap.add_argument("--seed", type=int, default=0, help="draws the calibration images")
    ap.add_argument("--max-drop", type=float, default=0.3, help="gate: validation accuracy points below fp32")
    ap.add_argument("--val-limit", type=int, default=0, help="first N validation images only (smoke runs)")
    ap.add_argument("--cpu", type=int, default=0, help="the core the process pins itself to (-1: no pinning)")
    ap.add_argument("--test-engine", default="auto", choices=("auto", "none", *ENGINES),
                    help="read the test split once at the end, for this engine and torch-fp32 (auto: the "
                         "chosen one, see `choose`; none: no test read)")
    ap.add_argument("--work-dir", default=None, help="keep exported/quantized files here (default: a temp dir)")
    ap.add_argument("--name", default="cpu-engines", help="record name under bench/results")
    args = ap.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    config = {k: v for k, v in vars(args).items() if k not in ("name", "work_dir")}
    config |= {"threads": 1, "affinity": sorted(os.sched_getaffinity(0)), "eval_batch": EVAL_BATCH,
               "reference": BASE, "versions": versions(),
               "cpu_flags": sorted({f for f in open("/proc/cpuinfo").read().split()
                                   if f.startswith(("avx512", "amx", "avx_vnni"))}) if sys.platform == "linux" else [],
               "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    m = header(config)
    results, contexts = {}, {}
    with tempfile.TemporaryDirectory(prefix="cpu-engines-") as tmp:
        work = Path(args.work_dir or tmp)
        for name in args.models:
            results[name], contexts[name] = measure_model(name, args, work)
        batch = 32 if 32 in args.batches else max(args.batches)
        chosen, table = choose(results, args.engines, batch)
        print(f"\nchosen (passes the gate on every model, best worst-case ratio at batch {batch}): {chosen}")
        if args.test_engine != "none" and (chosen or args.test_engine != "auto"):
            engine = chosen if args.test_engine == "auto" else args.test_engine
            for name in args.models:
                results[name]["test"] = test_read(name, contexts[name], engine)
    write_record(args.name, config, {"models": results, "choice": {"engine": chosen, "batch": batch,
                                                                    "engines": table}}, m)


if __name__ == "__main__":
    main()
