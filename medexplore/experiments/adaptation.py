"""Med-VTAB: every adaptation strategy from a medical expert (and GMoE mixing it with a general one),
one ``adapt-bench`` per seed, folded into one report."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..configs import load_recipe
from ..viz.experiments import arm_bars
from .adapt_bench import BenchSpec, run_adapt_bench
from .base import Experiment, spread_outcome, spread_verdict
from .report import Report, mean_spread, summarise

__all__ = ["adaptation"]

SINGLE_EXPERT_PEFT = ("adapter", "lora", "vpt_shallow", "vpt_deep")
PROMPTS = 10  # prompt tokens of the vpt strategies in the main table


def _expert(exp: Experiment, name: str, seed: int, data: dict, train: dict | None = None) -> dict:
    """A VICReg expert with the budget's model and pretraining recipe."""
    return exp.train(f"expert-{name}-seed{seed}", exp.pretrain_config(seed, data, train), mode="vicreg")


def adaptation(exp: Experiment) -> Report:
    recipe = exp.settings.recipe
    tables = []
    for seed in exp.settings.seeds:
        general = _expert(exp, "general", seed, {"datasets": ["natural"], "seed": seed, "annotations": "full",
                                                 "label_fraction": 1.0, "keep_tasks": None})
        # the medical expert pretrains for as many steps as the general one (its data is far smaller)
        medical = _expert(exp, "medical", seed, exp.settings.data,
                          {"steps_per_epoch": general["steps"] // recipe["pretrain"]["epochs"]})
        rest = {k: v for k, v in exp.settings.data.items() if k != "datasets" and v is not None}
        spec = BenchSpec(medical=medical["checkpoint"], general=general["checkpoint"],
                         datasets=tuple(exp.settings.datasets), data=rest, prompts=PROMPTS,
                         ood=exp.settings.budget == "full",  # the patient-level cells double the bench
                         train={**_cell_recipe(exp), "seed": seed, "device": exp.settings.device})
        table = run_adapt_bench(spec, exp.out / f"adapt-bench-seed{seed}", callbacks=exp.callbacks,
                                control=exp.control, log=lambda line: None)
        tables.append(table.assign(seed=seed))
    return _report(exp, pd.concat(tables, ignore_index=True))


def _cell_recipe(exp: Experiment) -> dict:
    """What every adaptation cell trains with: the bench default, the budget's train recipe, its adapt changes."""
    recipe = exp.settings.recipe
    return {**load_recipe("adapt_bench")["train"], **recipe["train"], **recipe["adapt"]}


def _metric_column(rows: pd.DataFrame) -> str:
    return "auc" if rows["auc"].notna().any() else "dice"


def _report(exp: Experiment, table: pd.DataFrame) -> Report:

    table.to_csv(exp.out / "metrics.csv", index=False)
    metric = _metric_column(table)
    report = Report("Adaptation strategies and the GMoE-Adapter (Med-VTAB)",
                    f"Data {exp.settings.datasets}, budget `{exp.settings.budget}`, seeds {list(exp.settings.seeds)}. "
                    "Per seed: a general expert (VICReg on photographs) and a medical expert (VICReg on the "
                    "data's training images, as many steps as the general one), then `adapt-bench` (every "
                    f"strategy, one recipe: {_cell_recipe(exp)['steps_per_epoch']} steps x "
                    f"{_cell_recipe(exp)['epochs']} epochs). Test split; the "
                    f"headline is {metric.upper()}. Each seed's own bench report: `adapt-bench-seedN/results.md`.")
    standard = table[(table["protocol"] == "standard")]
    main = standard[standard["prompts"].isin([0, PROMPTS])]  # the sweep's other prompt counts apart
    report.table("Test metric and cost per strategy (mean ± sd over seeds)",
                 summarise(main, ["dataset", "strategy"], [metric, "trainable", "step_memory_mb", "seconds"]))
    gains = []
    for (dataset, seed), rows in main.groupby(["dataset", "seed"]):
        single = rows[rows["strategy"].isin(SINGLE_EXPERT_PEFT)]
        gmoe = rows[rows["strategy"] == "gmoe"]
        if len(single) and len(gmoe):
            gains.append({"dataset": dataset, "seed": seed,
                          "gain": float(gmoe[metric].iloc[0] - single[metric].max())})
    if gains:
        g = pd.DataFrame(gains)
        per_dataset = g.groupby("dataset")["gain"].agg(["mean", "std"]).fillna(0.0)
        outcomes = [spread_outcome(m, sd) for m, sd in zip(per_dataset["mean"], per_dataset["std"])]
        report.verdict("the GMoE-Adapter beats the best single-expert parameter-efficient method (Med-VTAB: "
                       "+0.4 to +0.7 points)", spread_verdict(outcomes),
                       f"GMoE minus the best of {', '.join(SINGLE_EXPERT_PEFT)}: "
                       + ", ".join(f"{d} {mean_spread(100 * r['gain'], 2)} points" for d, r in g.groupby("dataset")))
    else:
        report.verdict("the GMoE-Adapter beats the best single-expert method", None, "no GMoE cell ran")
    sweep = standard[standard["strategy"] == "vpt_deep"]
    if sweep["prompts"].nunique() > 1:
        report.table("Prompt-count scaling (VPT-deep)", summarise(sweep, ["dataset", "prompts"], [metric]))
    ood = table[table["protocol"] == "patient_ood"]
    if len(ood):
        report.table("Patient-level out-of-distribution test (held-out patients)",
                     summarise(ood, ["dataset", "strategy"], ["auc", "ood_auc", "ood_drop"]))
        drop = ood.groupby("strategy")["ood_drop"].mean()
        report.verdict("every strategy loses accuracy on unseen patients", bool((drop < 0).all()) if len(drop) else None,
                       "mean AUC drop " + ", ".join(f"{s} {d:+.3f}" for s, d in drop.items() if np.isfinite(d)))
    else:
        report.text("Patient-level out-of-distribution cells run with `--budget full` (where samples carry patient ids).")
    figure = exp.out / "figures" / "adaptation.png"
    arm_bars(main.rename(columns={metric: "value"}), "dataset", "strategy", "value", f"test {metric.upper()}",
             "adaptation strategies").savefig(figure, dpi=100)
    report.figure(figure, f"Test {metric.upper()} per strategy (bars: mean, lines: sd, dots: seeds)", exp.out)
    return report
