"""Markdown tables from the JSON records in bench/results (reads files only, runs nothing).

    .venv/bin/python -m bench.report                               # print every table
    .venv/bin/python -m bench.report training load                 # print some (SECTIONS names them)
    .venv/bin/python -m bench.report --update BENCHMARKS.md README.md  # rewrite their marked sections

Each table is a function of the records; SECTIONS (at the end) pairs it with the name of the
section it fills, `<!-- begin:NAME -->` ... `<!-- end:NAME -->` in the Markdown files.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


TRAINING_RUNS = (  # (record suffix, where the model is, what the run is for)
    ("fashion-mnist", "Fashion-MNIST", "", "`model_store/fashion-mnist` (served)"),
    ("fashion-mnist", "Fashion-MNIST", "-none", "no memory: the memory's role"),
    ("cifar10", "CIFAR-10 (JPEG copy)", "", "`model_store/cifar10` (served)"),
    ("cifar10", "CIFAR-10 (JPEG copy)", "-e10", "the recipe's 10 epochs: the other candidate"),
    ("cifar10", "CIFAR-10 (JPEG copy)", "-none", "no memory, 10 epochs: the memory's role (beside -e10)"),
)


def training_table() -> str:
    rows = ["| data set | run | recipe, epochs | memory | validation (routed) | flip TTA on validation | "
            "test (routed) | head only | memory usage | threshold | training time (median epoch x epochs) | model |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ds, label, suffix, where in TRAINING_RUNS:
        r = load(f"train-{ds}{suffix}")
        if r is None or r["train_config"].get("recipe") in (None, "auto"):
            rows.append(f"| {label} | `{ds}{suffix}` | not run with this round's recipe | | | | | | | | | |")
            continue
        f, tc, tta = r["final"], r["train_config"], r.get("tta_choice", {})
        acc = tta.get("validation_accuracy")
        tta_cell = (f"{pct(acc['none'])} -> {pct(acc['flip'])}: {tta['chosen']}" if acc else
                    f"not chosen ({r['classifier'].get('tta', 'none')})")
        memory = r["classifier"]["memory"]
        usage = "-" if memory == "none" else pct(f["memory_usage"])
        seconds = [h["epoch_seconds"] for h in r["history"]]
        minutes, typical = sum(seconds) / 60, statistics.median(seconds) * len(seconds) / 60
        chosen = f"{r['routing']['confidence_threshold']:.2f}"
        rows.append(f"| {label} | `{ds}{suffix}` | {tc['recipe']}, {tc['epochs']} | {memory} | "
                    f"{pct(f['val_accuracy'])} | {tta_cell} | **{pct(f['test_accuracy'])}** | "
                    f"{pct(f['test_head_accuracy'])} | {usage} | {chosen} | {minutes:.1f} min ({typical:.1f}) | {where} |")
    return "\n".join(rows)


def sweep_table(name: str) -> str:
    r = load(f"train-{name}")
    if r is None:
        return f"(train-{name} not run)"
    rows = ["| threshold | memory usage | memory-path accuracy | overall accuracy (validation split) |",
            "|---|---|---|---|"]
    for s in r["threshold_sweep"]:
        rows.append(f"| {s['threshold']:.2f} | {pct(s['memory_usage'])} | {pct(s['memory_path_accuracy'])} | "
                    f"{pct(s['accuracy'])} |")
    return "\n".join(rows)


def overhead_table() -> str:
    r = load("train_step_overhead")
    if r is None:
        return "(train_step_overhead not run)"
    rows = ["| memory (10,000 items, full) | median step ms | q1 - q3 | ratio to no memory |", "|---|---|---|---|"]
    for k, v in r["results"].items():
        rows.append(f"| {k} | {v['median']:.1f} | {v['q1']:.1f} - {v['q3']:.1f} | {v['ratio_to_none']:.3f}x |")
    c = r["config"]
    rows.append(f"\n{c['repeats']} interleaved repeats after {c['warmup']} warm-up, backbone {c['backbone']}, "
                f"batch {c['batch_size']}, {c['channels']}x{c['image_size']}x{c['image_size']}, {c['precision']}; "
                f"machine: {r['machine']['cores']} cores, {r['machine']['torch_threads']} torch threads.")
    return "\n".join(rows)


def service_table() -> str:
    r = load("service_latency")
    if r is None:
        return "(service_latency not run)"
    res = r["results"]
    st = res["start_to_ready_s"]
    rows = [f"Start to ready (launch of `python -m service serve` to /readyz 200): median **{st['median']:.2f} s** "
            f"(min {st['min']:.2f}, max {st['max']:.2f}, {st['n']} starts).", "",
            "| one client, loopback, 28x28 PNG | p50 ms | p90 ms | p99 ms | requests |", "|---|---|---|---|---|"]
    for k, label in (("predict_ms", "/predict"), ("feedback_ms", "/feedback (durable commit to the feedback store included)")):
        v = res[k]
        rows.append(f"| {label} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {v['n']} |")
    b = res["bad_inputs"]
    rows += ["", f"Bad inputs: {b['tried']} cases, {b['as_expected']} answered with the expected status and a JSON "
                 f"body, **{b['5xx']} answered 5xx**; memory unchanged: {b['memory_unchanged']}; process alive: "
                 f"{b['process_alive']}.", "", "| endpoint | case | expected | got |", "|---|---|---|---|"]
    rows += [f"| {c.get('endpoint', '/predict')} | {c['case']} | {c['expected']} | {c['status']} |" for c in b["cases"]]
    return "\n".join(rows)


def service_headline() -> str:
    r, c = load("service_latency"), load("crash_recovery")
    if r is None or c is None:
        return "(service_latency or crash_recovery not run)"
    res, cr = r["results"], c["results"]
    b = res["bad_inputs"]
    return "\n".join([
        f"- Start to ready: **{res['start_to_ready_s']['median']:.2f} s** "
        f"(median of {res['start_to_ready_s']['n']}).",
        f"- `/predict`, one 28x28 PNG: p50 **{res['predict_ms']['p50']:.1f} ms**, "
        f"p99 **{res['predict_ms']['p99']:.1f} ms**; "
        f"`/feedback` (committed durably and about 25 iterations of the taught head rows' fit before the answer; 200 corrections in a row): p50 **{res['feedback_ms']['p50']:.1f} ms**, "
        f"p99 **{res['feedback_ms']['p99']:.1f} ms**.",
        f"- Bad input: {b['tried']} cases, {b['as_expected']} answered as expected (the refused ones a 4xx with a "
        f"JSON error, the {sum(c_['expected'] == 200 for c_ in b['cases'])} odd but valid images a 200), "
        f"**{b['5xx']} 5xx**, memory unchanged.",
        f"- kill -9 during a feedback stream, {len(cr['rounds'])} rounds: "
        f"{cr['acknowledged']} acknowledged feedback, **{cr['lost']} lost**; the restarted memory equals a rebuild "
        f"from the log alone in {len(cr['rounds']) - cr['rounds_differing_from_rebuild']} of {len(cr['rounds'])} "
        f"rounds.",
    ])


def crash_table() -> str:
    r = load("crash_recovery")
    if r is None:
        return "(crash_recovery not run)"
    res = r["results"]
    rows = [f"{len(res['rounds'])} rounds, one state folder: **{res['acknowledged']} acknowledged feedback, "
            f"{res['lost']} lost**; rounds whose restarted memory differs from a rebuild from the log alone: "
            f"**{res['rounds_differing_from_rebuild']}**.", "",
            "| round | acknowledged | lost | log applied up to seq | equals a rebuild from the log | restart s |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {x['round']} | {x['acknowledged']} | {x['lost']} | {x['applied_seq']} | "
             f"{x['equals_rebuild_from_log']} | {x['restart_seconds']:.2f} |" for x in res["rounds"]]
    rows.append("\nThe log can hold more than the acknowledged count: an example committed (and applied) "
                "whose response the kill cut off is kept, never lost.")
    return "\n".join(rows)


def policy_grid_table(name: str) -> str:
    r = load(f"online-policy-grid-{name}")
    if r is None:
        return f"(online-policy-grid-{name} not run)"
    res = r["results"]
    v = res["validation"]
    rows = [f"K = {res['k']} shots per new class, {r['config']['seeds']} draws; validation: {v['old']} old-class "
            f"images (the model's validation split) + {v['new_per_class']} per new class (its training images, "
            "never shots). Chosen: the best mean.", "",
            "| class balance | new-class threshold | new recall | old accuracy | mean(old, new) |", "|---|---|---|---|---|"]
    for t in res["table"]:
        best = t is not None and t["class_balance"] == res["chosen"]["class_balance"] and \
            t["new_class_threshold"] == res["chosen"]["new_class_threshold"]
        b = "**" if best else ""
        rows.append(f"| {t['class_balance']} | {t['new_class_threshold'] if t['new_class_threshold'] is not None else 'unset (= threshold)'} "
                    f"| {pct(t['new_recall'])} | {pct(t['old_accuracy'])} | {b}{pct(t['mean_old_new'])}{b} |")
    return "\n".join(rows)


def served_accuracy_table() -> str:
    rows = ["| model | engine | test images via HTTP | served accuracy | training report (test) | memory share | "
            "abstained (\"none of these\") | threshold |",
            "|---|---|---|---|---|---|---|---|"]
    for ds, label in (("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        for suffix in ("", "-eager"):
            r = load(f"served_accuracy-{ds}{suffix}")
            if r is None:
                if not suffix:
                    rows.append(f"| {label} | not run | | | | | | |")
                continue
            x = r["results"]
            engine = x.get("engine", "eager") + (" (the default: the manifest's)" if not suffix else " (ENGINE=eager)")
            rows.append(f"| {label} (`{ds}`, version {x['model_version']}) | {engine} | {x['images']} | "
                        f"**{pct(x['accuracy'])}** | {pct(x['manifest_test_accuracy'])} | {pct(x['memory_share'])} | "
                        f"{pct(x['abstained_share']) if 'abstained_share' in x else 'not measured'} | "
                        f"{x['policy']['confidence_threshold']} |")
    return "\n".join(rows)


def ood_table() -> str:
    """"None of these": AUROC of the ood_score against the other data set, validation and test."""
    choose, test = load("ood-choose"), load("ood-test")
    if choose is None or test is None:
        return "not run"
    goals = {"fashion-mnist": 0.99, "cifar10": 0.97}
    names = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG copy)"}
    rows = ["| model | out-of-distribution (test) | score (chosen on validation) | AUROC validation / **test** "
            "(goal) | test images abstaining: in / out | for comparison at test: knn-1, energy, max softmax |",
            "|---|---|---|---|---|---|"]
    for m, t in test["results"].items():
        c, a = choose["results"][m], t["auroc"]
        rows.append(f"| {names[m]} (`{m}`, version {t['model_version']}) | {t['out_of_distribution']} "
                    f"({t['n_out']}) | `{t['chosen']}`, threshold {t['threshold']:.4g} | "
                    f"{c['auroc'][t['chosen']]:.4f} / **{a[t['chosen']]:.4f}** ({goals[m]}) | "
                    f"{pct(t['in_abstained'])} / {pct(t['out_abstained'])} | "
                    f"{a['knn-1']:.4f}, {a['energy']:.4f}, {a['msp']:.4f} |")
    return "\n".join(rows)


def ood_choice_table() -> str:
    """"None of these": how the score was chosen: far and near validation AUROCs of candidates."""
    choose = load("ood-choose")
    if choose is None:
        return "not run"
    names = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG copy)"}
    rows = ["| model | score (validation) | far AUROC | near AUROC (8-class model) | mean: the rule |",
            "|---|---|---|---|---|"]
    for m, c in choose["results"].items():
        far, near, both = c["auroc"], c["near_auroc"], c["mean_far_near"]
        alone = max((k for k in both if "+" not in k), key=both.get)
        probe = max((k for k in far if k.startswith("probe-")), key=far.get)
        for k, what in ((alone, "the memory's part alone"), (probe, "the probe's part alone"),
                        (c["chosen"], "**chosen**")):
            rows.append(f"| {names[m]} | `{k}`: {what} | {far[k]:.4f} | {near[k]:.4f} | "
                        f"{(far[k] + near[k]) / 2:.4f} |")
    return "\n".join(rows)


def ood_near_table() -> str:
    """"None of these", near: each 8-class model against its two held-out classes."""
    r = load("ood-near")
    if r is None:
        return "not run"
    names = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG copy)"}
    rows = ["| model | held out (out-of-distribution) | score | AUROC validation / **test** (goal 0.90) | "
            "test images abstaining: in / out | best candidate at test |", "|---|---|---|---|---|---|"]
    for m, t in r["results"].items():
        v, te, score = t["validation"], t["test"], t["service_score"]
        best = max(te["auroc"], key=te["auroc"].get)
        rows.append(f"| {names[m]} 8 classes (`{t['model']}`, version {t['model_version']}) | "
                    f"{', '.join(t['held_out'])} ({te['n_out']} test images) | `{score}`, threshold "
                    f"{t['threshold']:.4g} | {v['auroc'][score]:.4f} / **{te['auroc'][score]:.4f}** | "
                    f"{pct(te['in_abstained'])} / {pct(te['out_abstained'])} | {best} {te['auroc'][best]:.4f} |")
    return "\n".join(rows)


def reliability_table() -> str:
    soak, crash, fuzz, svc = load("soak"), load("crash_recovery"), load("fuzz"), load("service_latency")
    rows = ["| check | figure | goal |", "|---|---|---|"]
    if soak:
        st = soak
        errors = sum(v for k, v in st["status"].items() if int(k) >= 500)
        rows.append(f"| soak: {st['clients']} clients, {st['seconds']:.0f} s, 90% /predict 10% /feedback | "
                    f"{st['requests']} requests ({st['by_kind'].get('predict', 0)} predict, "
                    f"{st['by_kind'].get('feedback', 0)} feedback), **{errors} 5xx, {st['connection_errors']} "
                    f"connection errors** | 0 |")
        rows.append(f"| soak: resident memory, first -> last quarter | {st['rss_first_quarter_mb']:.0f} -> "
                    f"{st['rss_last_quarter_mb']:.0f} MB (**{100 * st['rss_growth']:+.1f}%**) | < 10% |")
    if crash:
        c = crash["results"]
        rows.append(f"| kill -9 during feedback, restart | {len(c['rounds'])} rounds, "
                    f"{c['acknowledged']} acknowledged, **{c['lost']} lost**, memory differs from a rebuild from the "
                    f"log in {c['rounds_differing_from_rebuild']} rounds | 0 lost, 0 |")
    if fuzz:
        f = fuzz
        if "operations_reached" in f:  # the token sent to every path that needs one
            rows.append(f"| schemathesis from /openapi.json, real server | {f['cases']} cases over {f['operations']} "
                        f"operations ({f['operations_reached']} reached their handler: answered other than 401/403), "
                        f"**{f['failing_operations']} failing operations** (5xx or schema violation) | 0 |")
        elif "failing_operations" in f:  # earlier round: failures listed, whatever they were
            rows.append(f"| schemathesis from /openapi.json, real server | {f['cases']} cases over {f['operations']} "
                        f"operations, **{f['failing_operations']} failing operations** (5xx or schema violation) | 0 |")
        else:
            rows.append(f"| schemathesis from /openapi.json, real server (earlier round) | {f['cases']} cases over "
                        f"{f['operations']} operations, **{f['server_errors']} 5xx**, {f['failures']} schema "
                        "violations | 0 |")
    if svc:
        b = svc["results"]["bad_inputs"]
        wrong = b["tried"] - b["as_expected"]
        rows.append(f"| hostile uploads and labels (tests/corpus.py) | {b['tried']} tried, **{wrong} answered "
                    f"wrongly**, {b['5xx']} 5xx, memory unchanged: {b['memory_unchanged']} | 0 |")
    return "\n".join(rows)


def roundtrip_lines() -> str:
    out = []
    for name in ("fashion-mnist", "cifar10"):
        r = load(f"store_roundtrip-{name}")
        if r:
            res = r["results"]
            out.append(f"- `{name}`: {res['images']} test images, identical labels/paths/confidences/slots: "
                       f"**{res['all_identical']}**")
    return "\n".join(out) or "(store_roundtrip not run)"


def early_exit_table() -> str:
    rows = ["| data set | model | memory reads | threshold | accuracy (routed) | plain network | memory share "
            "| throughput vs plain (batch 256) | per sample: memory / network path (batch 1) "
            "| per sample, batched: memory / network path | memory path / plain (batch 1) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    found = False
    for ds, label in (("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        r = load(f"early_exit-{ds}")
        if r is None:
            continue
        found = True
        for x in r["results"]["rows"]:
            rows.append(
                f"| {label} | `{x['model']}` | {x['exit_stage']} | {x['threshold']:.2f} | {pct(x['accuracy'])} | "
                f"{pct(x['plain_accuracy'])} | {pct(x['memory_usage'])} | "
                f"{x['throughput_images_per_s']['median']:.0f} vs {x['plain_images_per_s']['median']:.0f} img/s = "
                f"**{x['speedup']:.2f}x** | {x['memory_path_ms']['median']:.2f} / {x['network_path_ms']['median']:.2f}"
                f" ms = **{x['memory_over_network_per_sample']:.2f}x** | "
                f"{x['batched_memory_path_ms']['median']:.3f} / {x['batched_network_path_ms']['median']:.3f} ms = "
                f"**{x['memory_over_network_batched']:.2f}x** | {x['memory_over_plain_per_sample']:.2f}x |")
    return "\n".join(rows) if found else "(early_exit not run)"


LOAD_NAMES = {"ours": "this service (default: 2 processes)", "ours-1proc": "this service, `--workers 1`",
              "ours-unbatched": "this service, MAX_BATCH_SIZE=1", "litserve-w1": "LitServe, workers_per_device 1",
              "litserve-w2": "LitServe, workers_per_device 2", "plain": "plain FastAPI, 1 torch thread",
              "ours-int8": "this service, int8 engine (2 processes)", "ours-1proc-int8": "this service, int8, `--workers 1`",
              "litserve-w1-int8": "LitServe on the int8 engine, workers_per_device 1",
              "litserve-w2-int8": "LitServe on the int8 engine, workers_per_device 2"}


def load_table() -> str:
    r = load("load")
    if r is None:
        return "(load not run)"
    res = r["results"]
    rows = ["| server | body | generator | clients | requests/s | p50 ms | p99 ms | server CPU ms / request | errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, row in res["table"].items():
        kind, body, gen, c = key.split("|")
        rows.append(f"| {LOAD_NAMES.get(kind, kind)} | {body} | {gen} | {c} | {row['rps']['median']:.0f} "
                    f"({row['rps']['min']:.0f}-{row['rps']['max']:.0f}) | {row['p50_us']['median'] / 1e3:.1f} | "
                    f"{row['p99_us']['median'] / 1e3:.1f} | {row['cpu_s_per_request']['median'] * 1e3:.2f} | "
                    f"{sum(x['errors'] for x in row['runs'])} |")
    cl = res["ceiling"]
    rows += ["", f"In-process ceiling (no HTTP, channels-last like every server): **{cl['best']['median']:.0f} "
                 f"images/s** at batch {cl['best_batch']} (model only); {cl['with_decode_at_best_batch']['median']:.0f} "
                 "images/s with PNG decoding. By batch: "
                 + ", ".join(f"{b}: {v['median']:.0f}" for b, v in cl["images_per_second_by_batch"].items())]
    same = all(v[k] for v in res["answers"].values() for k in v if k.startswith("answers_equal"))
    acc = sorted({v["accuracy"] for v in res["answers"].values()})
    rows += ["", f"Answers on the 200 images: every server's labels equal those of the first server on the same "
                 f"engine: **{same}**; accuracy {', '.join(f'{a:.1%}' for a in acc)}."]
    if "ceiling_int8" in res:
        c8 = res["ceiling_int8"]
        decoded = c8["with_decode_at_best_batch"]["median"]
        rows += ["", f"In-process ceiling on the int8 engine: **{c8['best']['median']:.0f} images/s** at batch "
                     f"{c8['best_batch']} (model only); "
                     + (f"{decoded:.0f} images/s with PNG decoding." if decoded else
                        "with PNG decoding not measured in this run (its best batch, 256, exceeded the 200 images "
                        "the decoding loop had: fixed since).")]
    one = load("load-one-client")
    if one is not None:
        t = one["results"]["table"]
        rows += ["", f"A lone client, {one['config']['repeats']} repeats of {one['config']['seconds']:.0f} s "
                     "(`python -m bench.perf.load --servers ours ours-unbatched --clients 1 --repeats 5 --bodies json "
                     "--record load-one-client`):", "",
                 "| generator | default (adaptive batching) p50 / p99 | MAX_BATCH_SIZE=1 p50 / p99 | p50 ratio |",
                 "|---|---|---|---|"]
        for gen in one["config"]["generators"]:
            a, b = t[f"ours|json|{gen}|1"], t[f"ours-unbatched|json|{gen}|1"]
            rows.append(f"| {gen} | {a['p50_us']['median'] / 1e3:.2f} / {a['p99_us']['median'] / 1e3:.2f} ms | "
                        f"{b['p50_us']['median'] / 1e3:.2f} / {b['p99_us']['median'] / 1e3:.2f} ms | "
                        f"**{a['p50_us']['median'] / b['p50_us']['median']:.2f}x** |")
    comparisons = (("ratios", "both eager fp32"),
                   ("ratios_int8_vs_eager_litserve", "ours on the int8 engine (as shipped), LitServe on the eager "
                                                     "model a user would hand it"),
                   ("ratios_int8", "both on the int8 engine"))
    rows += ["", "| comparison | generator, clients | ours (best of default / 1 process) | LitServe at its best | "
             "req/s ratio | p99 ratio | ours / ceiling | ours p50 / unbatched p50 |", "|---|---|---|---|---|---|---|---|"]
    for key, what in comparisons:
        for k, x in res.get(key, {}).items():
            def f(name, fmt="{:.2f}x"):
                return fmt.format(x[name]) if name in x else "n/a"
            rows.append(f"| {what} | {k} | {LOAD_NAMES.get(x.get('ours_best'), x.get('ours_best') or '-')} | "
                        f"{LOAD_NAMES.get(x.get('litserve_best'), x.get('litserve_best') or '-')} "
                        f"| **{f('rps_ratio')}** | {f('p99_ratio')} | {f('ours_over_ceiling', '{:.0%}')} | "
                        f"{f('ours_p50_over_unbatched_p50')} |")
    return "\n".join(rows)


def cpu_engines_shipped_table() -> str:
    """The chosen engine against eager fp32 on the shipped models (bench/perf/cpu_engines.py)."""
    r = load("cpu-engines-shipped")
    if r is None:
        return "(cpu-engines-shipped not run)"
    rows = ["| model | backbone | engine | images/s per core, batch 1 / 8 / 32 | ratio to eager at batch 32 | "
            "validation head accuracy (delta) | labels changed | test head accuracy (read once) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in r["results"]["models"].items():
        for e, label in (("torch-fp32", "eager fp32"), ("ov-int8", "OpenVINO int8")):
            x = m["engines"][e]
            rates = " / ".join(f"{x['images_per_s'][b]['median']:.0f}" for b in ("1", "8", "32"))
            v = x["validation"]
            delta = "-" if e == "torch-fp32" else f"{v['delta_points']:+.2f}"
            test = m.get("test", {}).get(e, {}).get("head_accuracy")
            rows.append(f"| `{name}` | {m['backbone']} | {label} | {rates} | "
                        f"**{x['images_per_s']['32']['ratio_to_fp32']:.2f}x** | {pct(v['head_accuracy'])} ({delta}) | "
                        f"{'-' if e == 'torch-fp32' else pct(v['label_changes'])} | {pct(test)} |")
    return "\n".join(rows)


def memory_scale_table() -> str:
    r = load("memory-scale")
    if r is None:
        return "(memory-scale not run)"
    res = r["results"]
    rows = [f"Memory of the 1M-item model: {res['memory_mb']:.0f} MB (keys float32 D 256, labels, write times).", "",
            "| memory | search | start to ready | peak RSS at ready | /predict p50 | /predict p99 |",
            "|---|---|---|---|---|---|"]
    for label, x in res.items():
        if not isinstance(x, dict) or "predict" not in x:
            continue
        size, index = label.split("-")
        rows.append(f"| {size} | {index} | {x['start_seconds']:.1f} s | {x['peak_rss_mb_at_ready']:.0f} MB | "
                    f"{x['predict']['p50_ms']:.2f} ms | {x['predict']['p99_ms']:.2f} ms |")
    rows += ["", "| memory | snapshot takes | /predict p99 during / outside | requests during | peak RSS growth |",
             "|---|---|---|---|---|"]
    for label, x in res.items():
        if isinstance(x, dict) and "snapshot" in x:
            sn = x["snapshot"]
            rows.append(f"| {label} | {sn['seconds']['median']:.1f} s | {sn['during']['p99_ms']:.2f} / "
                        f"{sn['outside']['p99_ms']:.2f} ms = **{sn['p99_during_over_outside']:.2f}x** | "
                        f"{sn['during']['n']} | {sn['peak_rss_growth_mb']:.0f} MB |")
    ra = res["ratios"]
    rows += ["", f"1M (IVF) /predict p50 over 10k exact (the default): **{ra['p50_1m_ivf_over_10k_exact']:.2f}x**, "
                 f"over 10k IVF: **{ra['p50_1m_ivf_over_10k_ivf']:.2f}x**. Start-up peak RSS beyond the 10k "
                 f"server's, over the memory's size: IVF **{ra['peak_rss_over_memory_1m_ivf']:.2f}x**"
                 + (f", exact **{ra['peak_rss_over_memory_1m_exact']:.2f}x**" if "peak_rss_over_memory_1m_exact" in ra
                    else "") + "."]
    return "\n".join(rows)


def hostile_table() -> str:
    r = load("hostile-images")
    if r is None:
        return "(hostile-images not run)"
    res = r["results"]
    rows = ["| image | file | decoder | CPU ms (median of 5) | extra memory |", "|---|---|---|---|---|"]
    for name, x in res["decode"].items():
        for which, y in x.items():
            if which == "bytes":
                continue
            rows.append(f"| {name} | {x['bytes'] / 1024:.0f} KB | {which} | {y['cpu_ms']['median']:.1f} | "
                        f"{y['extra_mb']:.1f} MB |")
    # the record's attack part posted 16-bit 4096x4096 PNGs, which the service now refuses
    # from their header (MAX_COSTLY_PIXELS): what it measured no longer happens, so it is not shown
    return "\n".join(rows)


def hostile_bodies_table() -> str:
    r = load("hostile-bodies")
    if r is None:
        return "(tests/test_hostile_bodies.py not run with HOSTILE_REPORT)"
    rows = [f"The idle server spends {r['idle_cpu_ms_per_s']:.0f} ms of CPU a second (the feedback log tail's "
            "polling), counted in each figure.", "",
            "| body | status | server CPU ms | extra resident MB |", "|---|---|---|---|"]
    rows += [f"| {b['body']} | {b['status']} | {b['cpu_ms']:.1f} | {b['extra_mb']:.1f} |" for b in r["bodies"]]
    return "\n".join(rows)


def request_cost_table() -> str:
    r = load("request-cost")
    if r is None:
        return "(request-cost not run)"
    res = r["results"]
    ip, http, b = res["in_process"], res["http"], res["bound"]
    names = {"json_body_us": "JSON body -> image bytes (pydantic + base64)",
             "header_read_us": "image header (the pixel budget)", "decode_us": "decode a 28x28 PNG",
             "answer_us": "build and serialise the answer", "request_metrics_us": "Prometheus updates of a request"}
    rows = ["| in this process, one torch thread | CPU us (median of 5) |", "|---|---|"]
    for k, label in names.items():
        rows.append(f"| {label} | {ip[k]['median']:.1f} |")
    for bsz in (1, 4, 16, 32):
        rows.append(f"| the model with its memory, per image at batch {bsz} (backbone alone) | "
                    f"{ip[f'predict_per_image_us_b{bsz}']['median']:.0f} "
                    f"({ip[f'backbone_per_image_us_b{bsz}']['median']:.0f}) |")
    for bsz in (1, 32):
        if f"probe_on_per_image_us_b{bsz}" in ip:
            on, off = ip[f"probe_on_per_image_us_b{bsz}"]["median"], ip[f"probe_off_per_image_us_b{bsz}"]["median"]
            rows.append(f"| the same at batch {bsz}, back to back: with the ood_score's probe / the memory's part "
                        f"alone | {on:.0f} / {off:.0f} ({on - off:+.0f}) |")
    rows += ["", "| over HTTP, default server, hey, 32 clients | requests/s | server CPU us / request |",
             "|---|---|---|"]
    for k, label in (("healthz", "GET /healthz"), ("refused_predict_422", "POST /predict refused after its JSON "
                                                                           "is parsed (422)"),
                     ("predict", "POST /predict")):
        rows.append(f"| {label} | {http[k]['rps']['median']:.0f} | {http[k]['cpu_us_per_request']['median']:.0f} |")
    lit = b["litserve_us_at_32_clients"]
    rows += ["", f"A server spending nothing beyond the refused request, one decode and the model at batch 16 would "
                 f"cost **{b['floor_us']:.0f} us** per request; this service costs {b['ours_us']:.0f} us; LitServe "
                 f"at its best (load record, 32 clients) {lit['wrk']:.0f} us (wrk) / {lit['hey']:.0f} us (hey). "
                 f"Best possible ratio over LitServe in requests/s on these cores: "
                 f"**{b['best_possible_ratio']['wrk']:.2f}x / {b['best_possible_ratio']['hey']:.2f}x**; at this "
                 f"service's measured cost {b['ratio_at_measured_cost']['wrk']:.2f}x / "
                 f"{b['ratio_at_measured_cost']['hey']:.2f}x."]
    return "\n".join(rows)


def png_decoders_table() -> str:
    r = load("png-decoders")
    if r is None:
        return "(png-decoders not run)"
    res = r["results"]
    rows = [f"`.venv/bin/python -m bench.perf.png_decoders`: the {res['file_bytes'] / 1024:.0f} KB file, "
            f"{res['filtered_bytes'] / 2**20:.0f} MB of filtered rows; CPU ms, median of 5 (min-max).", "",
            "| step | CPU ms |", "|---|---|"]
    for name, t in res["cpu_ms"].items():
        rows.append(f"| {name} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) |")
    return "\n".join(rows)


def retrieval_table() -> str:
    r = load("retrieval_scale")
    if r is None:
        return "(retrieval_scale not run)"
    rows = ["| items | D | batch | exact (ours) lookups/s | faiss IndexFlatIP | faiss / ours | IVF lookups/s "
            "| IVF / exact | IVF nprobe / nlist | IVF recall@1 | IVF build s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["results"]["rows"]:
        rows.append(f"| {x['items']:,} | {x['dim']} | {x['batch']} | {x['exact']['median']:,.0f} | "
                    f"{x['faiss_flat']['median']:,.0f} | {x['faiss_flat_over_exact']:.2f}x | "
                    f"{x['ivf']['median']:,.0f} | "
                    f"**{x['ivf_over_exact']:.1f}x** | {x['ivf_nprobe']} / {x['ivf_nlist']} | "
                    f"{x['ivf_recall_at_1']:.3f} | {x['ivf_build_seconds']:.1f} |")
    return "\n".join(rows)


def shift_table() -> str:
    rows = ["| data set | shift | K per class | shifted accuracy before -> after | change | clean accuracy before "
            "-> after | change |", "|---|---|---|---|---|---|---|"]
    found = False
    for ds, label in (("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        for tr in ("rot90", "invert"):
            r = load(f"online-shift-{ds}-{tr}")
            if r is None:
                continue
            found = True
            b = r["results"]["before"]
            for x in r["results"]["table"]:
                rows.append(f"| {label} | {tr} | {x['k']} | {pct(b['shifted_accuracy'])} -> "
                            f"{pct(x['shifted_accuracy'])} | **{x['shifted_gain_points']:+.1f} points** | "
                            f"{pct(b['clean_accuracy'])} -> {pct(x['clean_accuracy'])} | "
                            f"**{x['clean_change_points']:+.2f} points** |")
    return "\n".join(rows) if found else "(online-shift not run)"


def few_shot_test_table(ds: str) -> str:
    r = load(f"few-shot-test-{ds}")
    if r is None:
        return f"(few-shot-test-{ds} not run)"
    res = r["results"]
    as_trained = ""
    if "as_trained_settings" in res:
        as_trained = (" as-trained: the settings the model's training chose on pseudo-new classes ("
                      + ", ".join(f"{k} {res['as_trained_settings'][k]}" for k in res["service_settings"])
                      + "), in-process.")
    rows = [f"Before feedback, old classes: {pct(res['before']['old_accuracy'])}. Service settings (chosen on "
            f"validation at K = 10): {', '.join(f'{k} {v}' for k, v in res['service_settings'].items())}."
            f"{as_trained} {r['config']['draws']} draws per K: mean [min-max].", "",
            "| K | method | new-class recall | old-class accuracy (change) | mean(old, new) | service ahead by |",
            "|---|---|---|---|---|---|"]
    for k in r["config"]["ks"]:
        ts = [t for t in res["table"] if t["k"] == k]
        best_baseline = max(t["mean_old_new"] for t in ts if t["method"] not in ("service", "as-trained"))
        for t in ts:
            me = t["method"] in ("service", "as-trained")
            b = "**" if me else ""
            ahead = f"{100 * (t['mean_old_new'] - best_baseline):+.1f} points" if me else ""
            rows.append(f"| {k} | {b}{t['method']}{b} | {pct(t['new_recall'])} [{pct(t['new_recall_min'])}-"
                        f"{pct(t['new_recall_max'])}] | {pct(t['old_accuracy'])} ({t['old_change_points']:+.1f}) | "
                        f"{b}{pct(t['mean_old_new'])}{b} [{pct(t['mean_old_new_min'])}-{pct(t['mean_old_new_max'])}] "
                        f"| {ahead} |")
    return "\n".join(rows)


DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG copy)"}


def few_shot_latency_table() -> str:
    rows = ["| data set (8-class model, eager) | | one image: p50 | p99 | 10 images: p50 | **p99** | 50 images: p50 | p99 | requests (1 / 10 / 50 images) |",
            "|---|---|---|---|---|---|---|---|---|"]
    found = []
    for ds in ("fashion-mnist", "cifar10"):
        r = load(f"few-shot-latency-{ds}")
        if r is None:
            continue
        found.append(r["machine"]["time"])
        for variant, label in (("taught rows", "taught rows (the default)"), ("taught rows off", "taught rows off (`TAUGHT_ROWS=false`)")):
            m = r["results"][variant]["summary"]
            rows.append(f"| {DATASET_NAMES[ds]} | {label} | {m['one_image_p50_ms']:.0f} ms | {m['one_image_p99_ms']:.0f} ms | "
                        f"{m['k10_p50_ms']:.0f} ms | **{m['k10_p99_ms']:.0f} ms** | {m['k50_p50_ms']:.0f} ms | "
                        f"{m['k50_p99_ms']:.0f} ms | {m['one_image_requests']} / {m['k10_requests']} / {m['k50_requests']} |")
    if not found:
        return "(few-shot-latency not run)"
    return "\n".join(rows + ["", f"Measured {', '.join(found)}."])


def few_shot_choose_table(ds: str) -> str:
    r = load(f"few-shot-choose-{ds}")
    if r is None:
        return f"(few-shot-choose-{ds} not run)"
    res = r["results"]
    rows = ["| method | K | chosen setting | validation mean(old, new) | old | new |", "|---|---|---|---|---|---|"]
    s = res["service"]
    rows.append(f"| service | 10 (used for every K) | {', '.join(f'{k} {v}' for k, v in s['chosen'].items())} | "
                f"{pct(s['best']['mean_old_new'])} | {pct(s['best']['old_accuracy'])} | {pct(s['best']['new_recall'])} |")
    plain = [t for t in s["table"] if t.get("taught_distance_weight") == 0.0 and t["old_drop"] <= s["max_old_drop"]]
    if plain and s["chosen"].get("taught_distance_weight"):  # what the distance evidence adds
        p = max(plain, key=lambda t: t["mean_old_new"])
        rows.append(f"| service without distance evidence (taught_distance_weight 0, not chosen) | 10 | "
                    f"{', '.join(f'{k} {p[k]}' for k in s['chosen'])} | {pct(p['mean_old_new'])} | "
                    f"{pct(p['old_accuracy'])} | {pct(p['new_recall'])} |")
    if "best_unconstrained" in s:  # the choice keeps the old classes within max_old_drop; the best at any cost beside it
        u = s["best_unconstrained"]
        rows.append(f"| service, best mean at any cost (not chosen) | 10 | "
                    f"{', '.join(f'{k} {u[k]}' for k in s['chosen'])} | {pct(u['mean_old_new'])} | "
                    f"{pct(u['old_accuracy'])} | {pct(u['new_recall'])} |")
    for name, per_k in res["baselines"].items():
        for k, b in per_k.items():
            rows.append(f"| {name} | {k} | {', '.join(f'{a} {v}' for a, v in b['chosen'].items())} | "
                        f"{pct(b['best']['mean_old_new'])} | {pct(b['best']['old_accuracy'])} | "
                        f"{pct(b['best']['new_recall'])} |")
    return "\n".join(rows)


def shift_choose_table() -> str:
    rows = ["| data set | K per class | correction_bias | clean (validation) | shifted (validation) | |",
            "|---|---|---|---|---|---|"]
    found = False
    for ds, label in (("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        r = load(f"online-shift-choose-{ds}-rot90")
        if r is None:
            continue
        found = True
        res = r["results"]
        b = res["before"]
        rows.append(f"| {label} | 0 | - | {pct(b['clean_accuracy'])} | {pct(b['shifted_accuracy'])} | before |")
        for t in res["table"]:
            chosen = t["correction_bias"] == res["chosen"]["correction_bias"]
            mark = "**chosen**" if chosen else ""
            rows.append(f"| {label} | {res['k']} | {t['correction_bias']} | {pct(t['clean_accuracy'])} "
                        f"({100 * (t['clean_accuracy'] - b['clean_accuracy']):+.2f}) | {pct(t['shifted_accuracy'])} | "
                        f"{mark} |")
    return "\n".join(rows) if found else "(online-shift-choose not run)"


def update_file(path: Path, sections: dict) -> None:
    """Replace the text between `<!-- begin:NAME -->` and `<!-- end:NAME -->` markers."""
    text = path.read_text()
    for name, make in sections.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        if begin in text:
            head, rest = text.split(begin, 1)
            old, tail = rest.split(end, 1)
            try:
                body = make()
            except KeyError as e:  # a record written by an older version of its benchmark: keep the text
                print(f"{path}: section {name} kept as it was (its record lacks {e}; re-run its benchmark)")
                body = old.strip("\n")
            text = f"{head}{begin}\n{body}\n{end}{tail}"
    path.write_text(text)
    print(f"updated {path}")


# (section name, the function that writes its table): the order `bench.report` prints them in
SECTIONS: list[tuple[str, Callable[[], str]]] = [
    ("training", training_table),
    ("cpu-engines-shipped", cpu_engines_shipped_table),
    ("sweep-fashion-mnist", lambda: sweep_table("fashion-mnist")),
    ("sweep-cifar10", lambda: sweep_table("cifar10")),
    ("overhead", overhead_table),
    ("service", service_table),
    ("service-headline", service_headline),
    ("crash", crash_table),
    ("roundtrip", roundtrip_lines),
    ("reliability", reliability_table),
    ("early-exit", early_exit_table),
    ("load", load_table),
    ("retrieval", retrieval_table),
    ("memory-scale", memory_scale_table),
    ("memory-scale-runs", lambda: __import__("bench.perf.memory_scale", fromlist=["markdown"]).markdown()),
    ("hostile", hostile_table),
    ("png-decoders", png_decoders_table),
    ("hostile-bodies", hostile_bodies_table),
    ("request-cost", request_cost_table),
    ("shift", shift_table),
    ("policy-grid-fashion-mnist", lambda: policy_grid_table("fashion-mnist")),
    ("policy-grid-cifar10", lambda: policy_grid_table("cifar10")),
    ("served-accuracy", served_accuracy_table),
    ("ood", ood_table),
    ("ood-choice", ood_choice_table),
    ("shift-choose", shift_choose_table),
    ("ood-near", ood_near_table),
    ("few-shot-latency", few_shot_latency_table),
    *((f"few-shot-{ds}", lambda ds=ds: few_shot_test_table(ds)) for ds in ("fashion-mnist", "cifar10")),
    *((f"few-shot-choose-{ds}", lambda ds=ds: few_shot_choose_table(ds)) for ds in ("fashion-mnist", "cifar10")),
]


if __name__ == "__main__":
    sections = dict(SECTIONS)
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__ + "\nsections: " + " ".join(sections))
        sys.exit(0)
    if sys.argv[1:2] == ["--update"]:
        for f in sys.argv[2:]:
            update_file(Path(f), sections)
        sys.exit(0)
    wanted = sys.argv[1:] or list(sections)
    for k in wanted:
        print(f"<!-- {k} -->\n{sections[k]()}\n")
