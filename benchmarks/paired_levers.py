"""A lever against the recipe over paired seeds, on validation: the README's five-seed rule.

Each argument is a ``benchmarks/medmnist.py`` outcome (``outcome.json`` of a one-model run, or its copy in
``docs/experiments/medmnist5/levers/``); the recipe's and the lever's are paired by their ``seed``. It prints
per seed the mean validation AUC over the datasets (each task's best epoch) of both and their difference,
then the mean difference, its standard error, the one-sided t bound at ``--confidence`` and each dataset's
mean difference, and the verdict: adopt when the bound is above 0 and no dataset's mean falls by more than
``--max-drop``. The test split is not read.

Usage: python benchmarks/paired_levers.py --recipe R0.json R1.json ... --lever L0.json L1.json ...
       [--confidence 0.95] [--max-drop 0.01]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy import stats


def _val_aucs(path: Path) -> tuple[int, dict[str, float]]:
    try:
        record = json.loads(path.read_text())
        return int(record["seed"]), {name: float(d["val_auc"]) for name, d in record["datasets"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a benchmarks/medmnist.py outcome with a seed and val_auc per dataset ({err})")


def paired(recipe: dict[int, dict[str, float]], lever: dict[int, dict[str, float]], confidence: float,
           max_drop: float) -> dict:
    """Per-seed and per-dataset paired differences of the validation AUC, the t bound and the verdict."""
    seeds = sorted(set(recipe) & set(lever))
    if len(seeds) < 2:
        raise SystemExit(f"need at least two seeds run by both, got {seeds}")
    names = sorted(recipe[seeds[0]])
    for s in seeds:
        if sorted(recipe[s]) != names or sorted(lever[s]) != names:
            raise SystemExit(f"seed {s}: the two runs cover different datasets ({sorted(recipe[s])} / {sorted(lever[s])})")
    means = {s: (statistics.fmean(recipe[s].values()), statistics.fmean(lever[s].values())) for s in seeds}
    diffs = [means[s][1] - means[s][0] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    bound = statistics.fmean(diffs) - stats.t.ppf(confidence, len(diffs) - 1) * se
    by_dataset = {n: statistics.fmean(lever[s][n] - recipe[s][n] for s in seeds) for n in names}
    adopt = bound > 0 and min(by_dataset.values()) >= -max_drop
    return {"seeds": seeds, "means": means, "diffs": diffs, "mean_diff": statistics.fmean(diffs), "se": se,
            "bound": bound, "by_dataset": by_dataset, "adopt": adopt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", nargs="+", type=Path, required=True)
    parser.add_argument("--lever", nargs="+", type=Path, required=True)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--max-drop", type=float, default=0.01)
    args = parser.parse_args()
    if not 0.5 < args.confidence < 1:
        parser.error(f"--confidence must be in (0.5, 1), got {args.confidence}")
    recipe = dict(_val_aucs(p) for p in args.recipe)
    lever = dict(_val_aucs(p) for p in args.lever)
    r = paired(recipe, lever, args.confidence, args.max_drop)
    print("| seed | recipe val mean | lever val mean | difference |")
    print("|---|---|---|---|")
    for s, d in zip(r["seeds"], r["diffs"]):
        print(f"| {s} | {r['means'][s][0]:.3f} | {r['means'][s][1]:.3f} | {d:+.3f} |")
    print(f"mean difference {r['mean_diff']:+.4f}, standard error {r['se']:.4f}, one-sided {args.confidence:.0%} "
          f"bound {r['bound']:+.4f} over {len(r['seeds'])} seeds")
    print("by dataset: " + ", ".join(f"{n} {d:+.3f}" for n, d in r["by_dataset"].items()))
    print("verdict: " + ("adopt" if r["adopt"] else "not adopted")
          + f" (bound above 0 and no dataset below -{args.max_drop})")


if __name__ == "__main__":
    main()
