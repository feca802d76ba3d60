"""The ``medexplore`` command line: demo, models, datasets, pretrain, train, evaluate, calibrate, embed.

A thin layer over :mod:`medexplore.train.workflow`: parse, call the library, print.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from .configs import parse_overrides
    from .experiments.demo import demo
    from .train.progress import ProgressPrinter

    model = parse_overrides(args.model, ["model"], flag="--model", section="model").get("model", {})
    epochs = {k: v for k, v in (("pretrain_epochs", args.pretrain_epochs), ("epochs", args.epochs)) if v is not None}
    summary = demo(args.out, model=model, callbacks=[ProgressPrinter(args.quiet)], **epochs)
    print(json.dumps(summary["test_metrics"], indent=1, default=float))
    print(f"figures: {', '.join(summary['figures'])}\nrun directory: {args.out}")
    return 0


def cmd_datasets(args) -> int:
    from .data.embedded import EmbeddedConfig, cache_dir
    from .data.medmnist import MEDMNIST, default_root, medmnist_path

    root = Path(args.root) if args.root else default_root()
    cached = any(cache_dir().glob(f"embedded-v*-{EmbeddedConfig().key()}.npz"))
    print(f"embedded: multi-annotation 2D/3D images (MNI152, scikit-image, pydicom), "
          f"{'cached' if cached else 'generated on first use'} in {cache_dir()}")
    print(f"MedMNIST root: {root}")
    print(f"{'dataset':16s} {'kind':11s} {'dims':4s} {'modality':12s} {'body part':9s} {'classes':7s} {'licence':12s} local sizes")
    for flag, info in MEDMNIST.items():
        local = [str(s) for s in info.sizes if medmnist_path(flag, s, root).exists()]
        print(f"{flag:16s} {info.kind:11s} {info.dims}D   {info.modality:12s} {info.body_part:9s} {len(info.labels):<7d} "
              f"{info.licence:12s} {','.join(local) or '-'}")
    return 0


def _run(args, mode: str) -> int:
    from .configs import load_config, parse_overrides
    from .train.device import init_distributed
    from .train.progress import ProgressPrinter
    from .train.recipes import apply_medmnist_recipe, uses_medmnist_recipe
    from .train.workflow import run_training

    init_distributed()  # a no-op unless launched by torchrun

    config = load_config(args.config, args.set)
    if args.data_path:
        config["data"]["path"] = args.data_path
    if args.dataset:
        config["data"]["datasets"] = [args.dataset]
    if not args.config and uses_medmnist_recipe(config):
        config, note = apply_medmnist_recipe(config, parse_overrides(args.set, config), init=args.init)
        print(note, file=sys.stderr)
    for option in ("strategy", "weights", "general"):
        if getattr(args, option, None):
            config["adapt"][option] = getattr(args, option)
    outcome = run_training(config, args.out, mode, init=args.init, resume=args.resume,
                           callbacks=[ProgressPrinter(args.quiet)])
    if outcome.result.interrupted:
        print(f"medexplore {args.command}: interrupted at step {outcome.result.step}; saved "
              f"{Path(args.out) / 'checkpoints' / 'last'}; continue with --resume", file=sys.stderr)
        return 130
    if outcome.test_metrics:
        print(json.dumps({t: {k: m[k] for k in ("auc", "acc", "dice", "map@0.5", "mae") if k in m}
                          for t, m in outcome.test_metrics.items()}))
    print(f"run directory: {outcome.run_dir}")
    return 0


def cmd_train(args) -> int:
    return _run(args, "supervised")


def cmd_pretrain(args) -> int:
    return _run(args, "vicreg")


def _checkpoint_data(args):
    """(model, device, dataset) for a checkpoint and the split it was trained on (``--data-path`` applied)."""
    from .data.registry import build_dataset
    from .errors import UserError
    from .train.checkpoint import load_model
    from .train.device import resolve_device

    device = resolve_device(args.device)
    model, meta = load_model(Path(args.checkpoint), device)
    if not meta.get("data"):
        raise UserError(f"{args.checkpoint}: the checkpoint does not say which data it was trained on")
    data = dict(meta["data"])
    if args.root:
        data["root"] = args.root
    if args.data_path:
        data["path"] = args.data_path
    return model, device, build_dataset(data, args.split)


def cmd_evaluate(args) -> int:
    from .train.evaluate import evaluate

    model, device, dataset = _checkpoint_data(args)
    text = json.dumps(evaluate(model, dataset, device=device, flips=args.flips), indent=2, default=float)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


def cmd_models(args) -> int:
    from .pretrained import pretrained_models

    models = pretrained_models()
    if args.card:
        if args.card not in models:
            from .errors import UserError
            raise UserError(f"no shipped model {args.card!r}; shipped: {', '.join(models) or 'none'}")
        print(models[args.card].card.read_text())
        return 0
    for model in models.values():
        heads = f"tasks: {', '.join(model.tasks)}" if model.tasks else "a backbone, no task heads"
        print(f"{model.name}  ({model.size_bytes / 1e6:.1f} MB; {heads})\n    {model.summary}")
    print(f"{len(models)} shipped model(s); `medexplore models --card NAME` prints one's model card; "
          "use a NAME wherever a checkpoint folder goes")
    return 0


def cmd_calibrate(args) -> int:
    from .errors import UserError
    from .pretrained import FOLDER
    from .train.checkpoint import resolve_checkpoint
    from .train.workflow import calibrate_checkpoint

    folder = resolve_checkpoint(args.checkpoint)
    if folder.resolve().is_relative_to(FOLDER):
        raise UserError(f"{args.checkpoint} is a shipped model: copy it to a folder of your own to calibrate it")
    _, device, dataset = _checkpoint_data(args)
    defaults = calibrate_checkpoint(folder, dataset, device=device)
    print(json.dumps(defaults.to_dict(), indent=1))
    print(f"stored in {folder / 'meta.json'}")
    return 0


def cmd_embed(args) -> int:
    from .analysis.embeddings import compute_embeddings
    from .errors import UserError

    model, device, dataset = _checkpoint_data(args)
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name ending in .npz")
    embeddings = compute_embeddings(model, dataset, device=device, blocks=args.blocks, split=args.split,
                                    progress=not args.quiet, info={"checkpoint": str(Path(args.checkpoint).resolve())})
    embeddings.save(output)
    print(f"wrote {len(embeddings)} embeddings of width {embeddings.pooled.shape[1]} "
          f"(+ {len(embeddings.tasks)} per-task{', per-block' if args.blocks else ''}) to {output}")
    return 0


def cmd_adapt_bench(args) -> int:
    from .configs import load_config, load_recipe
    from .experiments.adapt_bench import BenchSpec, run_adapt_bench
    from .train.progress import ProgressPrinter

    config = load_config(args.config, args.set)
    spec = BenchSpec(medical=args.medical, general=args.general, datasets=tuple(args.datasets),
                     data={k: v for k, v in config["data"].items() if k != "datasets" and v is not None},
                     strategies=tuple(args.strategies), prompts=args.prompts, prompt_counts=tuple(args.prompt_counts),
                     sweep=tuple(args.sweep), ood=not args.no_ood, train=config["train"] or load_recipe("adapt_bench")["train"])
    table = run_adapt_bench(spec, args.out, callbacks=[ProgressPrinter(args.quiet)])
    print(f"{len(table)} cells; results in {Path(args.out) / 'results.csv'}, {Path(args.out) / 'results.md'}, "
          f"{Path(args.out) / 'adapt_bench.png'}")
    return 0


def cmd_experiment(args) -> int:
    from .configs import load_recipe, parse_overrides
    from .experiments import ExperimentSettings, run_experiment
    from .train.progress import ProgressPrinter

    data = {"datasets": args.data}
    if args.root:
        data["root"] = args.root
    overrides = parse_overrides(args.set, load_recipe("experiments")[args.budget])
    settings = ExperimentSettings(data=data, budget=args.budget, seeds=tuple(args.seeds), device=args.device,
                                  overrides=overrides)
    out = args.out or f"runs/experiments/{args.name}"
    report = run_experiment(args.name, out, settings, callbacks=[ProgressPrinter(args.quiet)])
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medexplore", description="Multitask multimodal medical-image learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the embedded data: VICReg, multitask training, test, figures")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--pretrain-epochs", type=int, help="VICReg epochs (default: the demo recipe's)")
    p.add_argument("--epochs", type=int, help="multitask epochs (default: the demo recipe's)")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. depth=6")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    text = "list the models that ship with medexplore (names usable wherever a checkpoint folder goes)"
    p = sub.add_parser("models", help=text, description=text)
    p.add_argument("--card", metavar="NAME", help="print this model's card")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", help="list the datasets and which MedMNIST sizes are on disk")
    p.add_argument("--root", help="MedMNIST folder (default ~/.medmnist or $MEDMNIST_ROOT)")
    p.set_defaults(func=cmd_datasets)

    for name, func, text in (("train", cmd_train, "supervised multitask training, then test evaluation"),
                             ("pretrain", cmd_pretrain, "VICReg self-supervised pretraining")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML file with model/data/train sections (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
        p.add_argument("--dataset", help="'embedded' or a MedMNIST flag (overrides data.datasets)")
        p.add_argument("--data-path", help="an explicit npz file for the dataset")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
        p.add_argument("--init", help="checkpoint folder or shipped model name to initialise matching weights "
                       "from (fine-tuning)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "train":
            from .adapt.strategies import STRATEGIES

            p.add_argument("--strategy", choices=STRATEGIES, help="adaptation strategy (sizes via --set adapt.KEY=VALUE)")
            p.add_argument("--weights", help="backbone weights: checkpoint folder, shipped model name, timm weights file or timm name")
            p.add_argument("--general", help="gmoe: the general expert's weights (same forms as --weights)")
        p.set_defaults(func=func)

    from .adapt.strategies import STRATEGIES
    from .experiments.protocol import PROMPT_COUNTS

    text = "adaptation benchmark: strategies x datasets -> results.csv/.md and a plot (resumable)"
    p = sub.add_parser("adapt-bench", help=text, description=text)
    p.add_argument("--medical", required=True, help="the medical expert: a checkpoint folder (e.g. VICReg pretraining)")
    p.add_argument("--general", help="the general expert for gmoe: checkpoint folder, timm weights file or timm name")
    p.add_argument("--datasets", nargs="+", default=["embedded"], help="dataset names (embedded, MedMNIST flags)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--prompts", type=int, default=10, help="prompt tokens of the vpt strategies")
    p.add_argument("--prompt-counts", type=int, nargs="+", default=list(PROMPT_COUNTS), help="the prompt sweep")
    p.add_argument("--sweep", nargs="*", default=[], help="datasets on which to run the prompt sweep")
    p.add_argument("--no-ood", action="store_true", help="skip the patient-level out-of-distribution cells")
    p.add_argument("--config", help="YAML with data (root, size) and train (the recipe every cell uses) sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", required=True, help="bench folder; run again to continue an interrupted bench")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_adapt_bench)

    from .experiments import BUDGETS, EXPERIMENTS

    text = "reproduce a claim of the works medexplore builds on: runs, report.md with verdicts (resumable)"
    p = sub.add_parser("experiment", help=text, description=text)
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--data", nargs="+", default=["embedded"], help="dataset names (embedded, MedMNIST flags)")
    p.add_argument("--root", help="MedMNIST folder (e.g. ../shared/data/medmnist)")
    p.add_argument("--budget", choices=BUDGETS, default="small", help="small: minutes on a CPU; full: longer runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (mean and spread over them)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change the budget's recipe, e.g. train.epochs=4 (sections model, train, pretrain, "
                        "adapt: what the adaptation cells change in train)")
    p.add_argument("--out", help="experiment folder (default runs/experiments/NAME); run again to continue")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_experiment)

    for name, func, text in (("evaluate", cmd_evaluate, "metrics of a checkpoint on a split"),
                             ("calibrate", cmd_calibrate, "store in a checkpoint its sliding-window size, the box threshold with the best "
                              "F0.5, the mask and region thresholds with the best Dice and whether boxes are read off a mask's kept "
                              "regions, measured on a split (default val; training runs do this themselves)"),
                             ("embed", cmd_embed, "embeddings (pooled, per task, per block) and metadata of a split, to one npz file "
                              "(read it with medexplore.analysis.load_embeddings)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", help="checkpoint folder (run/checkpoints/best) or shipped model name "
                       "(`medexplore models`)")
        p.add_argument("--split", default="val" if name == "calibrate" else "test", choices=("train", "val", "test"))
        p.add_argument("--root", help="folder of the MedMNIST files (default: the run's, else $MEDMNIST_ROOT "
                       "or ~/.medmnist)")
        p.add_argument("--data-path", help="an explicit npz file (default: the one the run used)")
        p.add_argument("--device", default="auto")
        if name != "calibrate":
            p.add_argument("--output", required=(name == "embed"), help="output file")
        if name == "evaluate":
            p.add_argument("--flips", action="store_true",
                           help="average image-level predictions over each image and its left-right mirror")
        if name == "embed":
            p.add_argument("--blocks", action="store_true", help="also keep every block's pooled tokens")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake is one line on stderr and exit 2, a bug keeps its traceback."""
    args = build_parser().parse_args(argv)
    from .errors import RunStopped, UserError
    from .train.checkpoint import checkpoint_exists
    from .train.events import NonFiniteLossError

    try:
        return args.func(args)
    except NonFiniteLossError as exc:
        print(f"medexplore {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"medexplore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder...: the path and the reason, on one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"medexplore {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunStopped) as exc:
        out = getattr(args, "out", None)
        saved = out is not None and checkpoint_exists(Path(out) / "checkpoints" / "last")
        advice = "continue with --resume" if saved and args.command in ("train", "pretrain") else "nothing was saved"
        if args.command in ("adapt-bench", "experiment"):
            advice = ("finished cells are in results.csv" if args.command == "adapt-bench" else "finished runs are kept")
            advice += "; run the same command again to continue"
        reason = f" ({exc})" if isinstance(exc, RunStopped) else ""
        print(f"medexplore {args.command}: interrupted{reason}; {advice}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
