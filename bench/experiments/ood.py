""""None of these": which score tells an image unlike anything the model knows (issue 24, item 3).

Each shipped model scores images of its own data set (in-distribution) and of the other data
set (out-of-distribution, "far": natural photos for the Fashion-MNIST model, clothes for the
CIFAR-10 model), the other set's images decoded by the service's own code
(`preprocess.decode_image`: grey <-> RGB, resized), as a client's upload would be.

Candidate scores (higher = less like anything known), all from one forward pass:
    knn-k      1 - cosine similarity of the k-th nearest memory item (Sun et al. 2022: the
               k-th neighbour on normalised features), k in KS
    msp        1 - the head's largest softmax probability
    energy     -logsumexp(head logits)
    maxlogit   -max head logit
    maha-s     squared Mahalanobis distance of the unit-length features to the nearest class
               mean of the memory's keys, shared covariance shrunk by s towards its mean
               variance (Lee et al. 2018), s in SHRINKS
    X+energy   the sum of the two, each standardised on the in-distribution validation images
    probe-s    the probe's part alone (core/novelty.py: the second block's averaged activations,
               Mahalanobis to the nearest trained class's mean, Gaussians fitted on training images)
    maha-s+probe-w  the service's score with the probe: maha-s and probe-s standardised on the
               in-distribution validation images, probe-s weighted by w in PROBE_WEIGHTS

choose (test sets not read): far: in-distribution = the model's own validation split (rebuilt
  from its manifest), out-of-distribution = the other data set's TRAINING images; near: the
  8-class model of the same data set (bench/train_models.sh fashion-mnist-8, cifar10-8), its
  validation split against the held-out classes' TRAINING images. Of the scores the service
  computes at the model's own shrink s (maha-s, maha-s+probe-w: s also scales the distances the
  taught rows weigh, with which training chose the online-learning settings) the one with the
  highest mean of the far and near AUROCs is kept (its w is the model's
  `--novelty-probe-weight`), and its
  threshold is the 95th percentile of the in-distribution validation scores (at most 5% of them
  abstain: what training and retrofit do). The best of all candidates is recorded beside it.
test: the chosen score and threshold on the test sets: in-distribution test images, the other
  set's TEST images; AUROC of every candidate reported (the chosen one marked), and the share
  of each side over the threshold.

near: each 8-class model (bench/train_models.sh fashion-mnist-8, cifar10-8) against the two
  classes it never saw: its own validation split (in) vs the held-out classes' training images,
  then its test images of the 8 classes vs the held-out classes' test images; every candidate's
  AUROC, the service's score (maha at the model's own shrink, threshold from its training)
  marked, with the share of each side that abstains.

    .venv/bin/python -m bench.experiments.ood choose
    .venv/bin/python -m bench.experiments.ood test
    .venv/bin/python -m bench.experiments.ood near
    .venv/bin/python -m bench.experiments.ood choose --models fashion-mnist --store runs/store \
        --name fashion-mnist-ls0 --tag=-ls0     # a candidate model, by the same rule (its validation split)
Records: bench/results/ood-choose.json, bench/results/ood-test.json, bench/results/ood-near.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.harness import CIFAR_ZIP, ROOT, header, png, record_path, write_record
from service.core.data import carve_validation, keep_classes, load_dataset, normalize, stratified_indices, \
    validation_of
from service.core.novelty import Novelty
from service.core.preprocess import ImageLimits, decode_image
from service.core.retrofit import PROBE_IMAGES, with_probe
from service.core.store import load_model

MODELS = {"fashion-mnist": ("fashion-mnist", None), "cifar10": ("cifar10", str(CIFAR_ZIP))}
OTHER = {"fashion-mnist": "cifar10", "cifar10": "fashion-mnist"}
KS = (1, 5, 10, 20, 50)
SHRINKS = (0.001, 0.01, 0.1, 0.3)  # covariance shrinkage towards its mean variance
PROBE_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5)  # the probe's weight in the service's score
IN_ABSTAIN = 0.05  # at most this share of in-distribution validation images abstain


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outside score > an inside score), ties counted half (Mann-Whitney U / n_in n_out)."""
    scores = torch.cat([inside, outside]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for v in scores.unique()[scores.unique(return_counts=True)[1] > 1]:  # average ranks of ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


@torch.no_grad()
def novelty_scorers(model, train, spec, seed: int, batch: int = 500) -> dict[str, Novelty]:
    """The service's own score (core/novelty.py) calibrated on the memory at every shrinkage,
    with the probe's Gaussians fitted on PROBE_IMAGES of `train` (a Split of uint8 training
    images: the pick calibrate_novelty makes) where the model has a probe."""
    probes = None
    if model.novelty.has_probe:
        pick = stratified_indices(train.labels, min(PROBE_IMAGES, len(train.labels)), seed)
        x = train.images[pick]
        probes = torch.cat([model.encode(normalize(x[i:i + batch], spec.mean, spec.std), probe=True)[2]
                            for i in range(0, len(x), batch)])
    out = {}
    for shrink in SHRINKS:
        n = Novelty(model.key_dim, model.config.memory_classes, probes.shape[1] if probes is not None else 0,
                    model.config.num_classes)
        n.calibrate(model.memory, shrink)
        if probes is not None:
            n.calibrate_probe(probes, train.labels[pick], shrink)
        out[f"maha-{shrink:g}"] = n
    return out


@torch.no_grad()
def raw_scores(model, x: torch.Tensor, scorers: dict[str, Novelty], batch: int = 500) -> dict[str, torch.Tensor]:
    """(N, C, H, W) normalised images -> every candidate's raw score (N,)."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), batch):
        keys, hidden, probes = model.encode(x[i:i + batch], probe=True)
        sims, _ = model.memory.search(keys, max(KS))  # (B, 50) descending
        logits = model.network_logits(hidden).float()  # (B, C)
        parts = {f"knn-{k}": 1 - sims[:, k - 1] for k in KS}
        parts["msp"] = 1 - torch.softmax(logits, -1).max(-1).values
        parts["energy"] = -torch.logsumexp(logits, -1)
        parts["maxlogit"] = -logits.max(-1).values
        for name, scorer in scorers.items():
            parts[name] = scorer.score(model.memory, keys)
            if probes is not None:
                parts[name.replace("maha", "probe")] = scorer.probe_score(probes)
        for name, v in parts.items():
            out.setdefault(name, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def validation_stats(s: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean and std of every score on the in-distribution validation images."""
    return {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in s.items()}


def with_combinations(s: dict[str, torch.Tensor], stats: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """Add X+energy: both standardised by the in-distribution validation `stats`."""
    z = lambda name: (s[name] - stats[name]["mean"]) / stats[name]["std"]  # noqa: E731
    pairs = [f"knn-{k}" for k in KS] + [f"maha-{x:g}" for x in SHRINKS]
    probe = {f"maha-{x:g}+probe-{w:g}": z(f"maha-{x:g}") + w * z(f"probe-{x:g}")  # Novelty.combine
             for x in SHRINKS for w in PROBE_WEIGHTS if f"probe-{x:g}" in s}
    return {**s, **{f"{p}+energy": z(p) + z("energy") for p in pairs}, **probe}


def served(name: str) -> bool:
    """A score the service computes: maha-s, or maha-s+probe-w."""
    return name.startswith("maha-") and ("+" not in name or "+probe-" in name)


def as_uploads(images: torch.Tensor, spec) -> torch.Tensor:
    """uint8 (N, C, H, W) of another data set -> what the service makes of them as PNG uploads."""
    limits = ImageLimits()
    return torch.stack([decode_image(png(im), spec, limits) for im in images])


def pick(n: int, total: int, seed: int) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def load_for_scores(store, name: str, dataset: str, data_dir, held_out: list[str] | None = None):
    """(model with room for a probe, its input spec, manifest, its data set (held-out classes
    removed), the novelty scorers fitted on its training split)."""
    loaded = load_model(store, name)
    model = with_probe(loaded.model).eval()
    ds = load_dataset(dataset, data_dir)
    own = keep_classes(ds, held_out) if held_out else ds
    record = loaded.manifest["data"]
    train, _, _ = carve_validation(own.train, record["validation_size"], record["validation_seed"])
    torch.set_num_threads(2)
    return model, loaded.input, loaded.manifest, ds, own, novelty_scorers(model, train, loaded.input,
                                                                          record["validation_seed"])


def scores_for(model_name: str, split: str, n_out: int, store=None, name_in_store=None) -> dict:
    """Far: the model's own images (validation split or test set) against the other data set's
    (training or test images) as uploads."""
    name, data_dir = MODELS[model_name]
    model, spec, manifest, _, own, scorers = load_for_scores(store or ROOT / "model_store",
                                                             name_in_store or model_name, name, data_dir)
    other_name, other_dir = MODELS[OTHER[model_name]]
    other = load_dataset(other_name, other_dir)
    inside = validation_of(own, manifest["data"]) if split == "validation" else own.test
    x_in = normalize(inside.images, spec.mean, spec.std)
    out_split = other.train if split == "validation" else other.test
    x_out = as_uploads(out_split.images[pick(n_out, len(out_split.labels), 2)], spec)
    return {"in": raw_scores(model, x_in, scorers), "out": raw_scores(model, x_out, scorers),
            "version": manifest.get("version"), "n_in": len(x_in), "n_out": len(x_out),
            "shrink": f"{float(model.novelty.shrink):g}"}


NEAR = {"fashion-mnist": ("fashion-mnist-8", ["Sneaker", "Bag"]), "cifar10": ("cifar10-8", ["truck", "ship"])}


def near_scores(m: str, split: str, n_out: int, stats: dict | None = None) -> dict:
    """Near: the 8-class model's own images of its 8 classes (validation split or test set)
    against the held-out classes' images (training images, n_out of them, or the test images);
    combinations standardised by `stats` (default: these validation scores')."""
    model_name, held_out = NEAR[m]
    name, data_dir = MODELS[m]
    model, spec, manifest, ds, own, scorers = load_for_scores(ROOT / "runs/store", model_name, name, data_dir,
                                                              held_out)
    unseen = torch.tensor([ds.classes.index(c) for c in held_out])
    inside = validation_of(ds, manifest["data"]) if split == "validation" else ds.test
    x_in = inside.images if split == "validation" else inside.images[~torch.isin(inside.labels, unseen)]
    pool = ds.train if split == "validation" else ds.test
    x_out = pool.images[torch.isin(pool.labels, unseen)]
    if split == "validation":
        x_out = x_out[pick(n_out, len(x_out), 2)]
    s_in = raw_scores(model, normalize(x_in, spec.mean, spec.std), scorers)
    s_out = raw_scores(model, normalize(x_out, spec.mean, spec.std), scorers)
    stats = stats or validation_stats(s_in)
    return {"in": with_combinations(s_in, stats), "out": with_combinations(s_out, stats), "stats": stats,
            "model": model_name, "held_out": held_out, "n_in": len(x_in), "n_out": len(x_out),
            "version": manifest.get("version"), "novelty": model.novelty, "policy": model.policy}


def choose(args) -> dict:
    results = {}
    for m in args.models:
        s = scores_for(m, "validation", args.n_out, args.store, args.name)
        stats = validation_stats(s["in"])
        ins, outs = with_combinations(s["in"], stats), with_combinations(s["out"], stats)
        far = {k: auroc(ins[k], outs[k]) for k in ins}
        n = near_scores(m, "validation", args.n_out)
        near = {k: auroc(n["in"][k], n["out"][k]) for k in n["in"]}
        # the memory part's shrink stays the model's: the taught rows' evidence reads the same
        # distances, and training chose the online-learning settings with it (online_choice.py)
        both = {k: (far[k] + near[k]) / 2 for k in far if served(k) and k in near
                and k.split("+")[0] == f"maha-{s['shrink']}"}
        best = max(both, key=both.get)
        best_any = max(far, key=far.get)
        threshold = float(torch.quantile(ins[best].double(), 1 - IN_ABSTAIN))
        results[m] = {"auroc": far, "near_auroc": near, "mean_far_near": both, "chosen": best, "best_any": best_any,
                      "threshold": threshold, "in_stats": stats, "n_in": s["n_in"], "n_out": s["n_out"],
                      "model_version": s["version"], "near_model": n["model"], "near_model_version": n["version"],
                      "out_of_distribution": f"{OTHER[m]} training images",
                      "near_out_of_distribution": f"{n['held_out']} training images"}
        print(m, "chosen", best, f"far {far[best]:.4f} near {near[best]:.4f} threshold {threshold:.4f}",
              {k: round(v, 4) for k, v in sorted(both.items(), key=lambda kv: -kv[1])}, flush=True)
    return results


def test(args) -> dict:
    chosen = json.loads(record_path("ood-choose").read_text())["results"]
    results = {}
    for m in args.models:
        c = chosen[m]
        s = scores_for(m, "test", args.n_out)
        ins, outs = with_combinations(s["in"], c["in_stats"]), with_combinations(s["out"], c["in_stats"])
        table = {k: auroc(ins[k], outs[k]) for k in ins}
        best, thr = c["chosen"], c["threshold"]
        results[m] = {"auroc": table, "chosen": best, "threshold": thr,
                      "in_abstained": float((ins[best] > thr).float().mean()),
                      "out_abstained": float((outs[best] > thr).float().mean()),
                      "n_in": s["n_in"], "n_out": s["n_out"], "model_version": s["version"],
                      "out_of_distribution": f"{OTHER[m]} test images"}
        print(m, best, f"AUROC {table[best]:.4f}", f"in abstain {results[m]['in_abstained']:.4f}",
              f"out abstain {results[m]['out_abstained']:.4f}", flush=True)
    return results


def service_score(novelty) -> str:
    """The candidate's name of the score a model serves (its shrink, its probe's weight)."""
    name = f"maha-{float(novelty.shrink):g}"
    return name + (f"+probe-{float(novelty.probe_weight):g}" if novelty.probe_calibrated else "")


def near(args) -> dict:
    results = {}
    for m in args.models:
        per_split, stats = {}, None
        for split in ("validation", "test"):
            n = near_scores(m, split, args.n_out, stats)
            stats = n["stats"]
            service, threshold = service_score(n["novelty"]), n["policy"].ood_threshold
            table = {k: auroc(n["in"][k], n["out"][k]) for k in n["in"]}
            per_split[split] = {"auroc": table, "n_in": n["n_in"], "n_out": n["n_out"],
                                "in_abstained": float((n["in"][service] > threshold).float().mean()),
                                "out_abstained": float((n["out"][service] > threshold).float().mean())}
            print(m, split, service, f"AUROC {table[service]:.4f}",
                  {k: round(v, 4) for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:5]}, flush=True)
        results[m] = {"model": n["model"], "model_version": n["version"], "held_out": n["held_out"],
                      "service_score": service, "threshold": threshold, **per_split,
                      "out_of_distribution": f"{n['held_out']} (validation: training images; test: test images)"}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["choose", "test", "near"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--n-out", type=int, default=2000, help="out-of-distribution images per model")
    ap.add_argument("--store", default=None, help="choose: another model store (a candidate model; default model_store)")
    ap.add_argument("--name", default=None, help="choose: the candidate's name in --store (one data set in --models)")
    ap.add_argument("--tag", default="", help="suffix of the record's name")
    args = ap.parse_args()
    if (args.store or args.name) and (args.experiment != "choose" or len(args.models) != 1):
        ap.error("--store/--name: choose, with one data set in --models")
    machine = header(vars(args))
    results = {"choose": choose, "test": test, "near": near}[args.experiment](args)
    write_record(f"ood-{args.experiment}{args.tag}", vars(args), results, machine)


if __name__ == "__main__":
    main()
