"""The demo, the notebooks' example model and a finished run's figures: whole runs built from
:func:`~medexplore.train.workflow.run_training`, drawn with :mod:`medexplore.viz`."""
from __future__ import annotations

import json
from pathlib import Path

from ..analysis.predictions import predict_samples
from ..configs import load_recipe
from ..data.registry import build_dataset
from ..errors import UserError
from ..models.kinds import kind_entry
from ..train.checkpoint import final_checkpoint, load_model
from ..train.workflow import run_training
from ..viz.figures import prediction_gallery, read_metrics, training_curves

__all__ = ["EXAMPLE_SIZES", "DEMO_RECIPE", "demo", "example_run", "write_figures", "gallery_samples"]

EXAMPLE_SIZES = load_recipe("example")  # the notebooks' example model: CPU minutes ("small") or a GPU ("large")


def gallery_samples(dataset, mask_task: str, n: int = 8) -> list:
    """``n`` samples to show: as many 2D as 3D ones, each with foreground in ``mask_task`` where
    possible (spread over the dataset), topped up with others."""
    samples = [dataset[i] for i in range(len(dataset))]
    marked = lambda s: s.labels.get(mask_task) is not None and bool((s.labels[mask_task] > 0).any())  # noqa: E731
    chosen: list = []
    kinds = sorted({s.image.dim() for s in samples})
    for k, dims in enumerate(kinds):
        pool = [s for s in samples if s.image.dim() == dims and marked(s)]
        want = (n - len(chosen)) // (len(kinds) - k)
        step = max(1, len(pool) // max(want, 1))
        chosen += pool[::step][:want]
    chosen += [s for s in samples if all(s is not c for c in chosen)][:n - len(chosen)]
    return chosen


def write_figures(run_dir: str | Path, n_examples: int = 8) -> list[Path]:
    """Training curves and a prediction gallery (test split) into ``run_dir/figures``."""
    run_dir = Path(run_dir)
    folder = run_dir / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    curves = training_curves(read_metrics(run_dir / "metrics.jsonl"))
    curves.savefig(folder / "training_curves.png", dpi=100)
    written.append(folder / "training_curves.png")
    model, meta = load_model(final_checkpoint(run_dir))
    outputs = {n: kind_entry(t.kind).output for n, t in model.tasks.items()}
    seg = next((n for n, output in outputs.items() if output == "mask"), None)
    box = next((n for n, output in outputs.items() if output == "boxes"), None)
    if seg:
        test = build_dataset(meta["data"], "test")
        results = predict_samples(model, gallery_samples(test, seg, n_examples))
        gallery = prediction_gallery(results, seg, box, score_threshold=0.3)  # focal-loss box scores run low
        gallery.savefig(folder / "predictions.png", dpi=100)
        written.append(folder / "predictions.png")
    return written


DEMO_RECIPE = load_recipe("demo")  # model, pretrain and train sections, epochs included


def demo(out: str | Path, pretrain_epochs: int | None = None, epochs: int | None = None,
         model: dict | None = None, seed: int = 0, callbacks=()) -> dict:
    """The main job: VICReg on the embedded images, multitask fine-tuning, test metrics and figures.

    ``model`` overrides the demo model's options (e.g. ``{"depth": 2}`` for a quick run); the epochs
    default to the recipe's (``medexplore/configs/demo.yaml``). The best
    checkpoint is chosen by the mean of every task's headline validation metric.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty; choose another directory")
    model_cfg = {**DEMO_RECIPE["model"], **(model or {})}
    data = {"datasets": ["embedded"], "seed": seed}
    pre = {"model": model_cfg, "data": data, "train": {**DEMO_RECIPE["pretrain"], "seed": seed}}
    sup = {"model": model_cfg, "data": data, "train": {**DEMO_RECIPE["train"], "seed": seed}}
    for section, value in ((pre, pretrain_epochs), (sup, epochs)):
        if value is not None:
            section["train"]["epochs"] = value
    pretrain = run_training(pre, out / "pretrain", mode="vicreg", callbacks=callbacks)
    finetune = run_training(sup, out / "multitask", init=pretrain.run_dir / "checkpoints" / "last", callbacks=callbacks)
    figures = write_figures(finetune.run_dir)
    summary = {"test_metrics": finetune.test_metrics, "figures": [str(f) for f in figures],
               "pretrain": str(pretrain.run_dir), "multitask": str(finetune.run_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def example_run(out: str | Path = "runs/example", size: str = "small", seed: int = 0, callbacks=()) -> Path:
    """A trained multitask model on the embedded data, trained on first use and reused afterwards.

    Returns the checkpoint folder (``best``, else ``last``). An interrupted run is resumed.
    """
    if size not in EXAMPLE_SIZES:
        raise UserError(f"size must be one of {sorted(EXAMPLE_SIZES)}, got {size!r}")
    out = Path(out)
    recipe = EXAMPLE_SIZES[size]
    config = {"model": dict(recipe["model"]), "data": {**recipe.get("data", {}), "datasets": ["embedded"], "seed": seed},
              "train": {**recipe["train"], "seed": seed}}
    if not (out / "test_metrics.json").exists():  # not finished: start, or continue where it stopped
        run_training(config, out, resume=True, callbacks=callbacks)
    return final_checkpoint(out)
