"""The ``medexplore`` command line: datasets, pretrain, train, evaluate, embed."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

__all__ = ["main", "load_config"]

DEFAULT_CONFIG = {
    "model": {"name": "medformer_tiny", "patch_size": 4},
    "data": {"datasets": ["pneumoniamnist"], "size": 28, "root": None, "path": None},
    "train": {},
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | None, overrides: list[str]) -> dict:
    """Defaults, then the YAML file, then ``--set section.key=value`` overrides."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    if path:
        p = Path(path)
        if not p.exists():
            raise CLIError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CLIError(f"config file {p}: invalid YAML: {exc}") from exc
        unknown = set(loaded) - set(DEFAULT_CONFIG)
        if unknown:
            raise CLIError(f"config file {p}: unknown section(s) {sorted(unknown)}; expected {sorted(DEFAULT_CONFIG)}")
        for section, values in loaded.items():
            config[section].update(values or {})
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CLIError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in config:
            raise CLIError(f"--set {item!r}: unknown section {section!r}; expected {sorted(config)}")
        config[section][name] = _parse_value(value)
    return config


# ---------------------------------------------------------------------------- builders
def build_datasets(data: dict, split: str):
    """The dataset a data section describes (one MedMNIST set, or several mixed)."""
    from .data.medmnist import MedMNIST
    from .data.sampling import MixedDataset

    names = data.get("datasets") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        raise CLIError("data.datasets is empty")
    if data.get("path") and len(names) != 1:
        raise CLIError("data.path names one npz file; give exactly one dataset with it")
    sets = {}
    for name in names:
        sets[name] = MedMNIST(name, split, size=int(data.get("size", 28)), root=data.get("root"), path=data.get("path"))
    return next(iter(sets.values())) if len(sets) == 1 else MixedDataset(sets)


def dataset_tasks(dataset) -> list:
    sources = getattr(dataset, "datasets", None)
    return [d.task for d in sources.values()] if sources else [dataset.task]


def build_model(model_cfg: dict, tasks: list, vocab_from=None):
    from .models import DomainVocab, create_model

    options = dict(model_cfg)
    name = options.pop("name", "medformer_tiny")
    if vocab_from is not None and "vocab" not in options:
        sources = getattr(vocab_from, "datasets", None) or {"": vocab_from}
        domains = [d.domain for d in sources.values()]
        options["vocab"] = DomainVocab(tuple(dict.fromkeys(d.modality for d in domains)),
                                       tuple(dict.fromkeys(d.body_part for d in domains)))
    return create_model(name, tasks=tasks, **options)


class ProgressPrinter:
    """Prints engine events: a tqdm bar for steps, one line per epoch/eval."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.bar = quiet, None

    def __call__(self, event) -> None:
        from tqdm.auto import tqdm

        if event.kind == "start" and not self.quiet:
            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        elif event.kind == "step" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.losses.get('loss', float('nan')):.4f}", sps=f"{event.samples_per_s:.0f}")
        elif event.kind == "epoch":
            val = {t: {k: round(v, 4) for k, v in m.items() if k in ("auc", "acc", "dice", "mae", "map@0.5")}
                   for t, m in event.metrics.items()}
            line = f"epoch {event.epoch} step {event.step}/{event.total_steps} loss {event.losses.get('loss', float('nan')):.4f}"
            (self.bar.write if self.bar else print)(line + (f" val {json.dumps(val)}" if val else ""))
        elif event.kind in ("done", "stopped") and self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- commands
def cmd_datasets(args) -> int:
    from .data.medmnist import MEDMNIST, default_root, medmnist_path

    root = Path(args.root) if args.root else default_root()
    print(f"MedMNIST root: {root}")
    print(f"{'dataset':16s} {'kind':11s} {'dims':4s} {'modality':12s} {'body part':9s} {'classes':7s} {'licence':12s} local sizes")
    for flag, info in MEDMNIST.items():
        local = [str(s) for s in info.sizes if medmnist_path(flag, s, root).exists()]
        print(f"{flag:16s} {info.kind:11s} {info.dims}D   {info.modality:12s} {info.body_part:9s} {len(info.labels):<7d} "
              f"{info.licence:12s} {','.join(local) or '-'}")
    return 0


def _run(args, mode: str) -> int:
    from .train import TrainConfig, Trainer

    config = load_config(args.config, args.set)
    if args.data_path:
        config["data"]["path"] = args.data_path
    if args.dataset:
        config["data"]["datasets"] = [args.dataset]
    train_set = build_datasets(config["data"], "train")
    val_set = build_datasets(config["data"], "val") if mode == "supervised" else None
    tasks = dataset_tasks(train_set) if mode == "supervised" else []
    model = build_model(config["model"], tasks, vocab_from=train_set)
    if args.init:
        _init_from(model, args.init)
    train_cfg = TrainConfig.from_dict({**config["train"], "mode": mode})
    out = Path(args.out)
    if not args.resume and out.exists() and any(out.iterdir()):
        raise CLIError(f"output directory {out} is not empty; use --resume or another --out")
    trainer = Trainer(model, train_set, train_cfg, out, val_data=val_set,
                      callbacks=[ProgressPrinter(args.quiet)], data_config=config["data"])
    result = trainer.fit(resume=args.resume)
    if mode == "supervised":
        test = build_datasets(config["data"], "test")
        best = out / "checkpoints" / ("best" if (out / "checkpoints" / "best").exists() else "last")
        from .train.checkpoint import load_model
        from .train.evaluate import evaluate

        best_model, _ = load_model(best, trainer.device)
        metrics = evaluate(best_model, test, train_cfg.eval_batch_size, trainer.device)
        (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        print(json.dumps({t: {k: m[k] for k in ("auc", "acc") if k in m} for t, m in metrics.items()}))
    print(f"run directory: {result.run_dir}")
    return 0


def _init_from(model, checkpoint: str) -> None:
    """Fine-tuning: copy every weight of ``checkpoint`` whose name and shape match (heads of new tasks stay new)."""
    from .train.checkpoint import load_checkpoint

    _, weights, _ = load_checkpoint(Path(checkpoint))
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    body = [k for k in own if k.startswith(("blocks.", "patch_embed."))]
    if not all(k in matched for k in body):
        raise CLIError(f"{checkpoint}: incompatible with this model configuration (body weights do not match)")
    model.load_state_dict(matched, strict=False)
    print(f"initialised {len(matched)}/{len(own)} tensors from {checkpoint}")


def cmd_train(args) -> int:
    return _run(args, "supervised")


def cmd_pretrain(args) -> int:
    return _run(args, "vicreg")


def cmd_evaluate(args) -> int:
    from .train.checkpoint import load_model
    from .train.engine import resolve_device
    from .train.evaluate import evaluate

    device = resolve_device(args.device)
    model, meta = load_model(Path(args.checkpoint), device)
    data = dict(meta.get("data") or DEFAULT_CONFIG["data"])
    if args.data_path:
        data["path"] = args.data_path
    metrics = evaluate(model, build_datasets(data, args.split), device=device)
    text = json.dumps(metrics, indent=2, default=float)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


def cmd_embed(args) -> int:
    from .train.checkpoint import load_model
    from .train.engine import resolve_device
    from .train.evaluate import collect_predictions

    device = resolve_device(args.device)
    model, meta = load_model(Path(args.checkpoint), device)
    data = dict(meta.get("data") or DEFAULT_CONFIG["data"])
    if args.data_path:
        data["path"] = args.data_path
    dataset = build_datasets(data, args.split)
    _, embeddings = collect_predictions(model, dataset, device=device, with_embeddings=True)
    samples = [dataset[i] for i in range(len(dataset))]
    labels = {name: [json.dumps(torch.as_tensor(s.labels[name]).tolist()) if name in s.labels else "" for s in samples]
              for name in sorted({k for s in samples for k in s.labels})}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, embeddings=embeddings.numpy(),
                        modality=np.array([s.domain.modality for s in samples]),
                        body_part=np.array([s.domain.body_part for s in samples]),
                        dimensionality=np.array([s.domain.dimensionality for s in samples]),
                        source=np.array([str(s.meta.get("source")) for s in samples]),
                        **{f"label_{k}": np.array(v) for k, v in labels.items()})
    tmp.replace(out)
    print(f"wrote {len(samples)} embeddings of width {embeddings.shape[1]} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medexplore", description="Multitask multimodal medical-image learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list the MedMNIST datasets and which sizes are on disk")
    p.add_argument("--root", help="MedMNIST folder (default ~/.medmnist or $MEDMNIST_ROOT)")
    p.set_defaults(func=cmd_datasets)

    for name, func, text in (("train", cmd_train, "supervised multitask training, then test evaluation"),
                             ("pretrain", cmd_pretrain, "VICReg self-supervised pretraining")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML file with model/data/train sections (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
        p.add_argument("--dataset", help="MedMNIST dataset name (overrides data.datasets)")
        p.add_argument("--data-path", help="an explicit npz file for the dataset")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
        p.add_argument("--init", help="checkpoint folder to initialise matching weights from (fine-tuning)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)

    for name, func, text in (("evaluate", cmd_evaluate, "metrics of a checkpoint on a split"),
                             ("embed", cmd_embed, "embeddings and metadata of a split, to an npz file")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", help="checkpoint folder (run/checkpoints/best)")
        p.add_argument("--split", default="test", choices=("train", "val", "test"))
        p.add_argument("--data-path", help="an explicit npz file (default: the one the run used)")
        p.add_argument("--device", default="auto")
        p.add_argument("--output", required=(name == "embed"), help="output file")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.checkpoint import CheckpointError
    from .train.engine import NonFiniteLossError

    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:
        print(f"medexplore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"medexplore {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"medexplore {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
