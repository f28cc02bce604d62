"""Feedback poisoning: one principal floods the store with adversarial feedback; does GRPO follow?

Scenario (Bitext customer-support intents, ``../shared/data/bitext_customer_support``; the SFT
model of ``make bench-grpo``: weak on ORDER/REFUND, cached under ``--work``):

1. **Honest feedback** on unseen training documents of the feedback categories (``--focus``):
   ``--honest-principals`` users with Zipf-distributed record counts (a few heavy users, many
   light ones); each rates the SFT model's served prediction from its F1 against the gold labels
   (``score = clip(round(1 + 4·F1 + noise), 1, 5)``) and a share corrects it, as in
   ``bench_grpo``. Never from test documents.
2. **The attacker**: one more principal holding each of ``--attacker-shares`` of all records
   (50 % and 90 %; texts are replayed when the flood outgrows them, each a new prediction id), on
   unseen training documents of the feedback categories (``--attack-categories focus``: where the
   honest feedback is and the model is unsure, so where GRPO can be steered; ``rest``: the other
   categories, where no honest feedback opposes the flood; ``all``: every category), one attack
   per ``--attacks`` entry (:data:`ATTACKS`): ``scores`` (5 when the served
   labels are wrong, 1 when they are right; the default) and ``targeted`` (the same scores plus a
   consistent wrong correction).
   Every record goes through the real :class:`~labelmatch.feedback.feedback_store.FeedbackStore`
   (upsert by prediction id and principal, as the server stores it) and its export.
3. **GRPO runs per seed**, same SFT model, same steps, same threshold data (the SFT validation
   split + the honest corrections; never the attacker's): clean (honest only) and each attack
   (honest + attacker), each without defences (``max_principal_share=1``) and with each cap of
   ``--caps`` (default the library's ``max_principal_share``).
4. **Test macro-F1** (labels present in the test split) of every run; dev (unused training
   documents) beside it. The goal: with defences the attacker moves test macro-F1 by < 1 point
   against the clean run; without them the damage shows.

Settings (the cap, the attack) are chosen with ``--parts dev`` (the test split is never scored:
``make bench-feedback-poisoning-select``, other seeds); the recorded run scores test once.

Writes ``feedback_poisoning.json``, ``feedback_poisoning.md`` and ``feedback_poisoning.png``
under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_grpo import DEFAULT_DATA, cached_sft, category_subset, part_metrics, pick_sft, sft_cache_key
from common import machine, mean_spread, write_outputs

from labelmatch.data.dataset import Dataset, Document, assign_splits, load_dataset
from labelmatch.evaluation.report import pyplot
from labelmatch.feedback.feedback_store import FeedbackRecord, FeedbackStore
from labelmatch.feedback.grpo import GRPOConfig, train_grpo
from labelmatch.model.classifier import Classifier
from labelmatch.training.config import TrainConfig

ATTACKER = "mallory"
#: What the attacker sends: ``scores``: 5 when the served labels are wrong, 1 when they are right;
#: ``targeted``: the same scores plus a consistent wrong correction on every record (each intent is
#: "corrected" to one fixed other intent and its category, a derangement of all intents), which the
#: feedback API accepts with a prediction id: a pattern GRPO can learn, not noise.
ATTACKS = ("scores", "targeted")


#: One GRPO run of a seed: ``(name, (attack, attacker share) or None, cap)``; cap 1.0 = no defence.
Condition = tuple[str, tuple[str, float] | None, float]


def cap_suffix(cap: float) -> str:
    """``_cap10`` for a cap of 0.10 (a condition name's suffix)."""
    return f"_cap{round(100 * cap)}"


def conditions(attacks: list[str], shares: list[float], caps: list[float]) -> list[Condition]:
    """Every run of a seed: clean, then each attack at each share; each without and with every cap."""
    runs: list[Condition] = [("clean", None, 1.0)] + [(f"clean{cap_suffix(c)}", None, c) for c in caps]
    for attack in attacks:
        for share in shares:
            name = f"{attack}_{round(100 * share)}"
            runs.append((name, (attack, share), 1.0))
            runs += [(f"{name}{cap_suffix(c)}", (attack, share), c) for c in caps]
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults sized for about 20 minutes on two shared CPU cores)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("bench/work/feedback_poisoning"))
    # The SFT model: bench_grpo's settings (same cache key, same model).
    parser.add_argument("--categories", default="ORDER,REFUND,ACCOUNT,PAYMENT,DELIVERY,INVOICE")
    parser.add_argument("--focus", default="ORDER,REFUND", help="Categories honest feedback comes from.")
    parser.add_argument("--sft-rest", type=int, default=12)
    parser.add_argument("--sft-focus", type=int, default=4)
    parser.add_argument("--corrupt", type=float, default=0.4)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the SFT model and the dev draw.")
    # Feedback.
    parser.add_argument("--honest-docs", type=int, default=96)
    parser.add_argument("--honest-principals", type=int, default=12)
    parser.add_argument("--zipf", type=float, default=1.0, help="Honest records per user ∝ 1/rank^zipf.")
    parser.add_argument("--corrected-share", type=float, default=0.3)
    parser.add_argument("--score-noise", type=float, default=0.6)
    parser.add_argument("--attacker-shares", default="0.5,0.9",
                        help="The attacker's share of all records, one flood per value.")
    parser.add_argument("--attacks", default="scores", help=f"Comma-separated, of {ATTACKS}.")
    parser.add_argument("--attack-categories", default="focus", choices=("focus", "rest", "all"),
                        help="Where the attacker's documents come from: 'focus' (where the honest feedback "
                        "is, the model's weak spot), 'rest' (the other categories: no honest feedback "
                        "opposes it) or 'all' (every category).")
    # GRPO and evaluation.
    parser.add_argument("--seeds", default="4,5,6,7", help="Feedback draws and GRPO seeds.")
    parser.add_argument("--grpo-steps", type=int, default=60, help="Steps of every run (bench-grpo's).")
    parser.add_argument("--lr", type=float, default=GRPOConfig.lr, help="GRPO learning rate.")
    parser.add_argument("--beta", type=float, default=GRPOConfig.beta, help="GRPO KL weight.")
    parser.add_argument("--target-kl", type=float, default=GRPOConfig.target_kl, help="KL budget (0: none).")
    parser.add_argument("--caps", default=str(GRPOConfig.max_principal_share),
                        help="Comma-separated max_principal_share values of the defended runs (default: the "
                             "library's).")
    parser.add_argument("--parts", default="test,dev",
                        help="What is scored: 'dev' alone for choosing settings (the test split untouched), "
                             "'test,dev' for the recorded run.")
    parser.add_argument("--name", default="feedback_poisoning", help="Stem of the result files.")
    parser.add_argument("--retune", choices=("val", "none"), default="val",
                        help="val: re-tune each run's thresholds on the SFT validation split + the honest "
                        "corrections (what the pipeline's grpo step does with its dataset); none: keep "
                        "the SFT thresholds (`labelmatch grpo` without --val-data).")
    parser.add_argument("--test-docs", type=int, default=0, help="Test documents (0: the whole test split).")
    parser.add_argument("--dev-docs", type=int, default=600, help="Unused training documents scored as dev.")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def zipf_counts(total: int, users: int, exponent: float) -> list[int]:
    """``total`` records over ``users`` users, user ``k`` holding ∝ ``1/k^exponent`` (each ≥ 1)."""
    raw = np.array([1.0 / (k + 1) ** exponent for k in range(users)])
    counts = np.maximum(1, np.floor(raw / raw.sum() * total)).astype(int)
    k = 0
    while counts.sum() < total:  # the remainder to the heaviest users
        counts[k % users] += 1
        k += 1
    while counts.sum() > total:
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def serve(classifier: Classifier, docs: list[Document], labels: dict[str, str]) -> list[Any]:
    """The SFT model's served predictions."""
    return classifier.predict([d.text for d in docs], labels, replace=True)


def honest_records(
    classifier: Classifier, docs: list[Document], labels: dict[str, str], args: argparse.Namespace,
    rng: random.Random,
) -> list[FeedbackRecord]:
    """Users rate the served prediction from its F1 against the truth (+ noise), some correct it."""
    counts = zipf_counts(len(docs), args.honest_principals, args.zipf)
    owners = [f"user-{k + 1:02d}" for k, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(owners)
    records = []
    for doc, prediction, owner in zip(docs, serve(classifier, docs, labels), owners, strict=True):
        truth, served = set(doc.labels), set(prediction.labels)
        f1 = 2 * len(truth & served) / max(len(truth) + len(served), 1)
        score = int(np.clip(round(1 + 4 * f1 + rng.gauss(0, args.score_noise)), 1, 5))
        corrected = list(doc.labels) if rng.random() < args.corrected_share else None
        records.append(FeedbackRecord(doc.text, "sft", prediction.labels, score, prediction.scores, corrected,
                                      "serve", principal=owner, prediction_id=doc.id))
    return records


def attacker_records(
    classifier: Classifier, docs: list[Document], labels: dict[str, str], attack: str,
    target: dict[tuple[str, ...], tuple[str, ...]],
) -> list[FeedbackRecord]:
    """The attacker's records (see :data:`ATTACKS`); ``target`` maps each true label set to the wrong one."""
    records = []
    for k, (doc, prediction) in enumerate(zip(docs, serve(classifier, docs, labels), strict=True)):
        score = 1 if set(prediction.labels) == set(doc.labels) else 5
        corrected = list(target[tuple(doc.labels)]) if attack == "targeted" else None
        records.append(FeedbackRecord(doc.text, "sft", prediction.labels, score, prediction.scores, corrected,
                                      "serve", principal=ATTACKER, prediction_id=f"{doc.id}-{k}"))
    return records


def export(records: list[FeedbackRecord], labels: dict[str, str], root: Path) -> Path:
    """The records through a fresh store (upserted as the server stores them) into an export."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = FeedbackStore(f"sqlite:///{root / 'feedback.db'}")
    store.register_model("sft", labels)
    for record in records:
        store.upsert(record)
    return store.export(root / "export", current_version="sft")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not (args.data / "docs.jsonl").is_file():
        print(f"error: {args.data}/docs.jsonl not found (pass --data)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    rng = random.Random(args.seed)
    focus = set(args.focus.split(","))
    data = category_subset(load_dataset(args.data), args.categories.split(","))
    labels = data.labels
    train = [d for d in data.documents if d.split == "train"]
    sft_docs, used = pick_sft(train, focus, args.sft_rest, args.sft_focus, args.corrupt, rng)
    test = [d for d in data.documents if d.split == "test"]
    test = random.Random(args.seed).sample(test, args.test_docs) if args.test_docs else test
    unused = [d for d in train if d.id not in used]
    dev = random.Random(args.seed + 1).sample(unused, args.dev_docs)
    pool = [d for d in unused if d.id not in {x.id for x in dev}]
    scored = set(args.parts.split(","))
    if not scored <= {"test", "dev"} or "dev" not in scored:
        print(f"error: --parts {args.parts!r}: 'dev' or 'test,dev'", file=sys.stderr)
        return 2
    parts = {"test": test, "test_feedback_distribution": [d for d in test if d.labels[0] in focus],
             "test_rest": [d for d in test if d.labels[0] not in focus], "dev": dev}
    parts = {k: v for k, v in parts.items() if k.split("_")[0] in scored}

    sft_set = assign_splits(Dataset(sft_docs, labels), val_fraction=0.2, test_fraction=0.0, seed=args.seed)
    train_config = TrainConfig(max_length=args.max_length, epochs=args.sft_epochs, batch_size=16,
                               seed=args.seed, progress=False, patience=5)
    tick = time.perf_counter()
    sft_dir, sft_reused = cached_sft(sft_set, train_config, args.work / f"sft-{sft_cache_key(args)}")
    print(f"SFT model {sft_dir} ({'reused' if sft_reused else 'trained'}, "
          f"{time.perf_counter() - tick:.0f} s)", flush=True)
    sft = Classifier.load(sft_dir)
    baseline = {part: part_metrics(sft, docs, labels) for part, docs in parts.items()}

    attacks, shares = args.attacks.split(","), [float(x) for x in args.attacker_shares.split(",")]
    caps = [float(x) for x in args.caps.split(",")]
    plan = conditions(attacks, shares, caps)
    n_attack = {share: round(args.honest_docs * share / (1 - share)) for share in shares}
    label_sets = sorted({tuple(d.labels) for d in train})
    shuffled = random.Random(args.seed).sample(label_sets, len(label_sets))
    target = {t: shuffled[(i + 1) % len(shuffled)] for i, t in enumerate(shuffled)}  # no fixed point
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        draw = random.Random(1000 + seed)
        honest_docs = draw.sample([d for d in pool if d.labels[0] in focus], args.honest_docs)
        honest = honest_records(sft, honest_docs, labels, args, draw)
        taken = {d.id for d in honest_docs}
        attack_pool = [d for d in pool if d.id not in taken
                       and (args.attack_categories == "all"
                            or (d.labels[0] in focus) == (args.attack_categories == "focus"))]
        attack_records = {}
        for share in shares:
            # A flood larger than the pool replays texts: each request is a new served prediction id.
            n = n_attack[share]
            docs = draw.sample(attack_pool, n) if n <= len(attack_pool) else draw.choices(attack_pool, k=n)
            for attack in attacks:
                attack_records[(attack, share)] = attacker_records(sft, docs, labels, attack, target)
        # Threshold data GRPO may see: SFT's validation split + the honest corrections (no test data).
        val = Dataset([d for d in sft_set.documents if d.split == "val"] + [
            Document(f"fb-{r.prediction_id}", r.text, list(r.corrected_labels))
            for r in honest if r.corrected_labels
        ], labels)
        exports = {None: export(honest, labels, args.work / f"s{seed}" / "feedback-clean")}
        for (attack, share), records in attack_records.items():
            where = args.work / f"s{seed}" / f"feedback-{attack}-{round(100 * share)}"
            exports[(attack, share)] = export(honest + records, labels, where)
        for name, attack, cap in plan:
            tick = time.perf_counter()
            config = GRPOConfig(steps=args.grpo_steps, lr=args.lr, beta=args.beta,
                                target_kl=args.target_kl or None, max_length=args.max_length, seed=seed,
                                progress=True,
                                max_principal_share=cap,
                                # The cap alone is measured: no rehearsal of the SFT data to mask the flood.
                                replay_kl_weight=0.0, replay_bce_weight=0.0)
            out = args.work / f"s{seed}" / f"model-{name}"
            summary = train_grpo(sft_dir, exports[attack], out, config,
                                 val_dataset=val if args.retune == "val" else None)
            model = Classifier.load(out)
            metrics = {part: part_metrics(model, docs, labels) for part, docs in parts.items()}
            principals = summary["principals"]
            run = {
                "seed": seed, "condition": name, "attack": attack[0] if attack else None,
                "attacker_records_share": attack[1] if attack else 0.0, "defended": cap < 1.0,
                "max_principal_share": config.max_principal_share, "metrics": metrics,
                "principals": principals,
                "attacker_share": {
                    "records": n_attack[attack[1]] / (n_attack[attack[1]] + len(honest)) if attack else 0.0,
                    "weight_before": _share(principals, ATTACKER, "share_before"),
                    "weight_after": _share(principals, ATTACKER, "share_after"),
                },
                "steps": summary["steps"], "final_kl": summary["final_kl"],
                "stopped_early": summary["stopped_early"], "seconds": round(time.perf_counter() - tick, 1),
            }
            runs.append(run)
            print(f"[{len(runs)}/{len(seeds) * len(plan)}] seed {seed} {name}: "
                  + "".join(f"{part} macro-F1 {metrics[part]['macro_f1']:.4f}, " for part in ("test", "dev")
                            if part in metrics)
                  + f"attacker weight {run['attacker_share']['weight_after']:.3f}, {run['seconds']:.0f} s, "
                  f"elapsed {time.perf_counter() - started:.0f} s", flush=True)
        score_histogram = {
            "honest": {str(s): sum(r.score == s for r in honest) for s in range(1, 6)},
            "attacker": {str(s): sum(r.score == s for r in next(iter(attack_records.values())))
                         for s in range(1, 6)},
        }
    report = summarise(args, runs, baseline, seeds, plan, {
        "honest": args.honest_docs, "attacker": {str(k): v for k, v in n_attack.items()},
        "honest_principals": args.honest_principals,
        "score_histogram_last_seed": score_histogram, "sft_documents": len(sft_docs),
        "test_documents": len(test), "labels": len(labels)})
    report["command"] = " ".join(["python bench/bench_feedback_poisoning.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    report["timings"] = {"total_seconds": round(time.perf_counter() - started, 1),
                         "grpo_seconds": [r["seconds"] for r in runs]}
    write_outputs(args.out, args.name, report, markdown, plot, plot_key="image", indent=2)
    return 0


def _share(principals: dict[str, Any], who: str, key: str) -> float:
    """``who``'s share (``share_before``/``share_after``) in a principals report (0 when absent)."""
    return next((row[key] for row in principals["top"] if row["principal"] == who), 0.0)


def summarise(
    args: argparse.Namespace, runs: list[dict[str, Any]], baseline: dict[str, Any], seeds: list[int],
    plan: list[Condition], counts: dict[str, Any],
) -> dict[str, Any]:
    """Mean ± spread per condition and each attack's effect (paired by seed) against the clean runs."""
    by = {(r["condition"], r["seed"]): r for r in runs}

    def f1(name: str, seed: int, part: str) -> float:
        return by[(name, seed)]["metrics"][part]["macro_f1"]

    scored = [p for p in ("test", "test_feedback_distribution", "test_rest", "dev") if p in baseline]
    table = {name: {part: mean_spread([f1(name, s, part) for s in seeds]) for part in scored}
             for name, _, _ in plan}
    caps = sorted({cap for _, _, cap in plan if cap < 1.0})
    pairs = [(f"clean{cap_suffix(cap)}", "clean") for cap in caps]
    for name, attack, cap in plan:
        if attack:
            pairs += [(name, "clean")] + ([(name, f"clean{cap_suffix(cap)}")] if cap < 1.0 else [])
    effects = {
        f"{name}_vs_{reference}": {
            part: mean_spread([100 * (f1(name, s, part) - f1(reference, s, part)) for s in seeds])
            for part in ("test", "dev") if part in scored
        }
        for name, reference in pairs
    }
    # The goal is judged on test when it was scored, else (choosing settings) on dev.
    judged = "test" if "test" in scored else "dev"
    goals = {}
    for name in (name for name, attack, cap in plan if attack and cap == 1.0):
        undefended = effects[f"{name}_vs_clean"][judged]["mean"]
        for cap in caps:
            defended = effects[f"{name}{cap_suffix(cap)}_vs_clean{cap_suffix(cap)}"][judged]["mean"]
            goals[f"{name}{cap_suffix(cap)}"] = {
                "part": judged, "cap": cap,
                "attacker_effect_defended_points": defended,
                "attacker_effect_undefended_points": undefended,
                "cap_cost_points": effects[f"clean{cap_suffix(cap)}_vs_clean"][judged]["mean"],
                "defended_vs_clean_without_cap_points":
                    effects[f"{name}{cap_suffix(cap)}_vs_clean"][judged]["mean"],
                "defended_within_1_point": abs(defended) < 1.0,
                "damage_shown": undefended < min(defended, 0.0),
                "undefended_damage_1_point": undefended <= -1.0,
            }
    return {
        "machine": machine(),
        "dataset": args.data.name,
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **counts,
        "sft": {part: m["macro_f1"] for part, m in baseline.items()},
        "conditions": table,
        "effects_points": effects,
        "goal": "with defences, the attacker moves test macro-F1 by < 1 point: attacked vs clean, both "
                "with the same cap (the attacker's effect on the defended system); without defences the "
                "damage shows (attacked vs clean, both uncapped: a larger loss than the defended one). "
                "Reported beside it: the cap's own cost on honest feedback (clean capped vs clean) and "
                "attacked-capped vs clean-uncapped (means over seeds, paired)",
        "goals": goals,
        "runs": runs,
    }


def plot(report: dict[str, Any], path: Path) -> str:
    """Test macro-F1 per condition (mean, spread, seeds) and the attacker's share of records and weight."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [5, 2]})
    names = list(report["conditions"])
    part = "test" if "test" in report["sft"] else "dev"
    for x, name in enumerate(names):
        stat = report["conditions"][name][part]
        colour = "#ddcc77" if "_cap" in name else "#cc6677"
        colour = "#44aa99" if name.startswith("clean") else colour
        left.bar(x, stat["mean"], yerr=stat["spread"], color=colour, capsize=4)
        left.scatter([x] * len(stat["values"]), stat["values"], color="#332288", s=12, zorder=3)
    left.axhline(report["sft"][part], color="grey", ls="--", label="SFT (no GRPO)")
    ticks = [n.replace("attack_", "").replace("_", "\n") for n in names]
    left.set_xticks(range(len(names)), ticks, fontsize=8)
    low = min(min(report["conditions"][n][part]["values"]) for n in names)
    left.set_ylim(min(low, report["sft"][part]) - 0.03, None)
    left.set_ylabel(f"{part} macro-F1")
    left.set_title("GRPO on clean vs flooded feedback (red: no defence, yellow: capped)")
    left.legend(loc="lower left")
    records = sorted({r["attacker_records_share"] for r in report["runs"] if r["attack"]})
    capped = [min(r["attacker_share"]["weight_after"] for r in report["runs"]
                  if r["attacker_records_share"] == share and r["defended"]) for share in records]
    x = np.arange(len(records))
    right.bar(x - 0.2, records, width=0.4, color="#cc6677", label="records = weight, no cap")
    right.bar(x + 0.2, capped, width=0.4, color="#ddcc77", label="weight, capped (tightest cap)")
    right.set_xticks(x, [f"{share:.0%} flood" for share in records])
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.set_title("the attacker's share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary."""
    s, c, e = report["setup"], report["conditions"], report["effects_points"]
    sft = report["sft"]
    parts = [p for p in ("test", "test_feedback_distribution", "test_rest", "dev") if p in sft]
    headers = {"test": "test macro-F1", "test_feedback_distribution": "test: feedback categories",
               "test_rest": "test: rest", "dev": "dev macro-F1"}
    lines = [
        "# Feedback poisoning — GRPO with and without the per-principal cap",
        "",
        f"Data: `{report['dataset']}`, categories {s['categories']} ({report['labels']} labels). SFT: "
        f"{report['sft_documents']} documents, weak on {s['focus']} (bench-grpo's model). Honest feedback: "
        f"{report['honest']} records on unseen {s['focus']} training documents from "
        f"{report['honest_principals']} users (Zipf {s['zipf']} record counts), scored from the "
        f"served prediction's F1 against the gold labels (+ N(0, {s['score_noise']})), "
        f"{s['corrected_share']:.0%} corrected. Attacker `{ATTACKER}`: "
        + ", ".join(f"{n} records ({float(k):.0%} of all)" for k, n in report["attacker"].items())
        + " on unseen training documents of "
        + {"all": "every category", "rest": f"the categories other than {s['focus']}"}.get(
            s["attack_categories"], s["focus"]) + " (texts replayed when "
        "the flood outgrows them, each a new served prediction); attack "
        "`scores`: 5 for wrong served labels, 1 for right ones; attack `targeted`: the same plus a "
        "consistent wrong correction on every record (each intent relabelled as one fixed other intent "
        "and its category). Score histograms (last seed): "
        f"{report['score_histogram_last_seed']}.",
        f"GRPO: lr {s['lr']}, β {s['beta']}, KL budget {s['target_kl'] or None} (library defaults unless "
        f"changed; replay of the SFT data off, so the cap alone is measured), "
        f"{s['grpo_steps']} steps per run, seeds {s['seeds']} (feedback draws and "
        f"GRPO); `capNN` runs cap each principal at `max_principal_share=0.NN` (caps {s['caps']}), the "
        "others run with 1.0 (no cap); "
        + ("thresholds re-tuned on the SFT validation split + the honest corrections in every run."
           if s["retune"] == "val" else "SFT thresholds kept.")
        + (f" Test: {report['test_documents']} test-split documents (all categories); " if "test" in sft
           else " **Settings run: the test split is not scored.** ")
        + f"dev: {s['dev_docs']} unused training documents. Macro-F1 over the labels present; mean ± half "
        "the range over seeds.",
        "",
        "| condition | " + " | ".join(headers[p] for p in parts) + " |",
        "|---" * (len(parts) + 1) + "|",
        "| SFT (no GRPO) | " + " | ".join(f"{sft[p]:.4f}" for p in parts) + " |",
    ]
    for name in c:
        cells = " | ".join(f"{c[name][p]['mean']:.4f} ± {c[name][p]['spread']:.4f}" for p in parts)
        lines.append(f"| {name.replace('_', ' ')} | {cells} |")
    scored = [p for p in ("test", "dev") if p in sft]
    lines += ["", "Effect in macro-F1 points, paired by seed:", "",
              "| comparison | " + " | ".join(f"{p} | {p}, per seed" for p in scored) + " |",
              "|---" * (2 * len(scored) + 1) + "|"]
    for key, value in e.items():
        cells = " | ".join(f"{value[p]['mean']:+.2f} ± {value[p]['spread']:.2f} | "
                           + " ".join(f"{v:+.2f}" for v in value[p]["values"]) for p in scored)
        lines.append(f"| {key.replace('_vs_', ' vs ').replace('_', ' ')} | {cells} |")
    defended = [r for r in report["runs"] if r["attack"] and r["defended"]]
    clean = [r for r in report["runs"] if r["condition"].startswith("clean_cap")]
    if defended:
        first = [r for r in defended if r["seed"] == defended[0]["seed"]]
        lines += [
            "",
            f"The cap (seed {defended[0]['seed']}): " + "; ".join(
                f"{r['condition']}: {r['principals']['principals']} principals, "
                f"{r['principals']['capped_principals']} capped, the attacker's weight "
                f"{r['attacker_share']['weight_before']:.3f} → {r['attacker_share']['weight_after']:.3f}, "
                f"{100 * r['principals']['weight_moved']:.1f}% of the run's weight moved" for r in first)
            + ". Honest feedback alone: " + ", ".join(
                f"{r['condition']} seed {r['seed']}: {q['capped_principals']} of {q['principals']} users "
                f"capped, largest share {q['largest_share_before']:.3f} → {q['largest_share_after']:.3f}, "
                f"{100 * q['weight_moved']:.1f}% moved" for r in clean for q in [r["principals"]]) + ".",
        ]
    judged = next(iter(report["goals"].values()), {}).get("part", "test")
    lines += ["", f"Goal ({judged}, paired means over seeds): with defences the attacker moves macro-F1 by "
              "< 1 point (attacked vs clean, both with the same cap); without them the damage shows "
              "(the uncapped loss is larger). Beside it: the cap's own cost on honest feedback and "
              "attacked-capped vs clean-uncapped:", ""]
    for name, goal in report["goals"].items():
        lines.append(
            f"* `{name}`: the attacker's effect with the cap {goal['attacker_effect_defended_points']:+.2f} "
            f"(< 1 point: **{'yes' if goal['defended_within_1_point'] else 'NO'}**), without "
            f"{goal['attacker_effect_undefended_points']:+.2f} (damage shown: "
            f"**{'yes' if goal['damage_shown'] else 'NO'}**, ≥ 1 point: "
            f"{'yes' if goal['undefended_damage_1_point'] else 'no'}); the cap's own cost "
            f"{goal['cap_cost_points']:+.2f}; capped attack vs clean without the cap "
            f"{goal['defended_vs_clean_without_cap_points']:+.2f}")
    lines += [
        "",
        "Runs: " + "; ".join(
            f"{r['condition']} s{r['seed']}: {r['steps']} steps, KL {r['final_kl']:.3f}"
            f"{' (KL budget)' if r['stopped_early'] else ''}, {r['seconds']:.0f} s"
            for r in report["runs"]) + ".",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared), {s['threads']} "
        f"torch thread; total {report['timings']['total_seconds']:.0f} s. Command: "
        f"`{report['command']}`.",
        "",
        f"![macro-F1 by condition]({report['image']})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
