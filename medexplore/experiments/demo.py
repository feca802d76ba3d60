"""The demo, the notebooks' example model and a finished run's figures: whole runs built from
:func:`~medexplore.train.workflow.run_training`, drawn with :mod:`medexplore.viz`."""
from __future__ import annotations

import json
from pathlib import Path

from ..analysis.predictions import predict_samples
from ..data.registry import build_dataset
from ..models.kinds import kind_entry
from ..train.checkpoint import final_checkpoint, load_model
from ..train.workflow import run_training
from ..viz.figures import prediction_gallery, read_metrics, training_curves

__all__ = ["EXAMPLE_SIZES", "DEMO_RECIPE", "DEMO_EPOCHS", "demo", "example_run", "write_figures", "gallery_samples"]

EXAMPLE_SIZES = {  # a multitask model on the embedded data for notebooks: CPU minutes, or a bigger one on a GPU
    "small": {"model": {"name": "medformer_tiny", "patch_size": 4, "depth": 3, "embed_dim": 64, "num_heads": 2},
              "train": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "monitor": "auc"}},
    "large": {"model": {"name": "medformer_tiny", "patch_size": 4},
              "train": {"epochs": 30, "batch_size": 32, "lr": 5e-4, "monitor": "auc"}},
}



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


DEMO_RECIPE = {  # set-up plus demo within 10 minutes on 2 CPU cores (README); every task visibly learned
    "model": {"name": "medformer_tiny", "patch_size": 4, "depth": 6, "embed_dim": 128, "num_heads": 4,
              "seg_channels": 16},  # the decoders' convolutions were 58% of a step at 32 channels
    "pretrain": {"batch_size": 64, "lr": 1e-3, "expander": [512, 512]},
    "train": {"batch_size": 32, "lr": 1e-3, "monitor": "headline"},
}
DEMO_EPOCHS = (3, 55)  # VICReg, multitask


def demo(out: str | Path, pretrain_epochs: int = DEMO_EPOCHS[0], epochs: int = DEMO_EPOCHS[1],
         model: dict | None = None, seed: int = 0, callbacks=()) -> dict:
    """The main job: VICReg on the embedded images, multitask fine-tuning, test metrics and figures.

    ``model`` overrides the demo model's options (e.g. ``{"depth": 2}`` for a quick run). The best
    checkpoint is chosen by the mean of every task's headline validation metric.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty; choose another directory")
    model_cfg = {**DEMO_RECIPE["model"], **(model or {})}
    data = {"datasets": ["embedded"], "seed": seed}
    pre = {"model": model_cfg, "data": data, "train": {**DEMO_RECIPE["pretrain"], "epochs": pretrain_epochs, "seed": seed}}
    sup = {"model": model_cfg, "data": data, "train": {**DEMO_RECIPE["train"], "epochs": epochs, "seed": seed}}
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
        raise ValueError(f"size must be one of {sorted(EXAMPLE_SIZES)}, got {size!r}")
    out = Path(out)
    recipe = EXAMPLE_SIZES[size]
    config = {"model": dict(recipe["model"]), "data": {"datasets": ["embedded"], "seed": seed},
              "train": {**recipe["train"], "seed": seed}}
    if not (out / "test_metrics.json").exists():  # not finished: start, or continue where it stopped
        run_training(config, out, resume=True, callbacks=callbacks)
    return final_checkpoint(out)
