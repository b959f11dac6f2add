"""Markdown tables from the JSON records in bench/results (reads files only, runs nothing).

    .venv/bin/python bench/report.py                               # print every table
    .venv/bin/python bench/report.py --update BENCHMARKS.md README.md  # rewrite their marked sections
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def training_table() -> str:
    rows = ["| data set | memory | test accuracy (routed) | head only | memory usage | memory-path accuracy "
            "| memory-path / network-path time | epochs | model |",
            "|---|---|---|---|---|---|---|---|---|"]
    for ds, label in (("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        for kind, suffix in (("cached", ""), ("trainable", "-trainable"), ("none", "-none")):
            r = load(f"train-{ds}{suffix}")
            if r is None:
                rows.append(f"| {label} | {kind} | not run | | | | | | |")
                continue
            f, s = r["final"], r["inference_speed"]
            ratio = s.get("memory_over_network")
            timing = "n/a (no memory)" if kind == "none" else (
                f"{s['memory_path_ms']:.2f} / {s['network_path_ms']:.2f} ms = {ratio:.2f}x")
            usage = "-" if kind == "none" else pct(f["memory_usage"])
            mem_acc = "-" if kind == "none" else pct(f["memory_path_accuracy"])
            where = (f"`model_store/{ds}`" if suffix == "" else
                     f"comparison, not kept: `bench/train_models.sh {ds}{suffix}`")
            rows.append(f"| {label} | {kind} | **{pct(f['test_accuracy'])}** | {pct(f['test_head_accuracy'])} | "
                        f"{usage} | {mem_acc} | {timing} | {len(r['history'])} | {where} |")
    return "\n".join(rows)


def sweep_table(name: str) -> str:
    r = load(f"train-{name}")
    if r is None:
        return f"(train-{name} not run)"
    rows = ["| threshold | memory usage | memory-path accuracy | overall accuracy |", "|---|---|---|---|"]
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
    for k, label in (("predict_ms", "/predict"), ("feedback_ms", "/feedback (journal fsync included)")):
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
        f"`/feedback` (fsync before the answer): p50 **{res['feedback_ms']['p50']:.1f} ms**, "
        f"p99 **{res['feedback_ms']['p99']:.1f} ms**.",
        f"- Bad input: {b['tried']} cases, {b['as_expected']} answered as expected (the refused ones a 4xx with a "
        f"JSON error, the {sum(c_['expected'] == 200 for c_ in b['cases'])} odd but valid images a 200), "
        f"**{b['5xx']} 5xx**, memory unchanged.",
        f"- kill -9 during a feedback stream, {len(cr['rounds'])} rounds: "
        f"{cr['acknowledged']} acknowledged feedback, "
        f"**{cr['lost']} lost**, {cr['duplicates']} applied twice.",
    ])


def crash_table() -> str:
    r = load("crash_recovery")
    if r is None:
        return "(crash_recovery not run)"
    res = r["results"]
    rows = [f"{len(res['rounds'])} rounds, one state folder: **{res['acknowledged']} acknowledged feedback, "
            f"{res['lost']} lost, {res['duplicates']} applied twice**.", "",
            "| round | acknowledged | lost | journal records after restart | restart s |", "|---|---|---|---|---|"]
    rows += [f"| {x['round']} | {x['acknowledged']} | {x['lost']} | {x['journal_records']} | "
             f"{x['restart_seconds']:.2f} |" for x in res["rounds"]]
    rows.append("\nJournal records can exceed the acknowledged count: a feedback journalled (and applied) "
                "whose response the kill cut off is kept, never lost.")
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
                    f"{c['acknowledged']} acknowledged, **{c['lost']} lost**, {c['duplicates']} twice | 0 lost |")
    if fuzz:
        f = fuzz
        rows.append(f"| schemathesis from /openapi.json, real server | {f['cases']} cases over {f['operations']} "
                    f"operations, **{f['server_errors']} 5xx**, {f['failures']} schema violations | 0 |")
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


def update_file(path: Path, sections: dict) -> None:
    """Replace the text between `<!-- begin:NAME -->` and `<!-- end:NAME -->` markers."""
    text = path.read_text()
    for name, make in sections.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        if begin in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{make()}\n{end}{tail}"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    sections = {"training": training_table, "sweep-fashion-mnist": lambda: sweep_table("fashion-mnist"),
                "sweep-cifar10": lambda: sweep_table("cifar10"), "overhead": overhead_table,
                "service": service_table, "service-headline": service_headline, "crash": crash_table,
                "roundtrip": roundtrip_lines, "reliability": reliability_table}
    if sys.argv[1:2] == ["--update"]:
        for f in sys.argv[2:]:
            update_file(Path(f), sections)
        sys.exit(0)
    wanted = sys.argv[1:] or list(sections)
    for k in wanted:
        print(f"<!-- {k} -->\n{sections[k]()}\n")
