"""Training loop: exact resume, events, pause/stop, non-finite losses, checkpoints, VICReg mode."""
import dataclasses
import json
import os
import threading

import pytest
import torch

from medexplore.data import Sample
from medexplore.models import Domain, TaskSpec, create_model
from medexplore.train import (
    CheckpointError,
    NonFiniteLossError,
    RunControl,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_model,
)
from medexplore.train.callbacks import monitor_value

TASKS = [TaskSpec("cls", "multiclass", 3), TaskSpec("reg", "regression", 1)]


def toy_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = i % 3
        dims = 2 if i % 4 else 3
        img = torch.randn(1, *([8] * dims), generator=g) + y
        labels = {"cls": y} if i % 5 else {"cls": y, "reg": float(y) / 2}
        out.append(Sample(img, Domain(f"{dims}d", "mri" if dims == 3 else "xray", "chest"), labels))
    return out


def toy_model(seed=0, tasks=TASKS, **kw):
    torch.manual_seed(seed)
    options = dict(embed_dim=24, depth=1, num_heads=2, patch_size=4, drop_path_rate=0.1)
    return create_model("medformer_tiny", tasks=tasks, **{**options, **kw})


CFG = TrainConfig(epochs=3, batch_size=8, lr=1e-3, checkpoint_every=2, device="cpu", monitor="acc")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # benchmarks/gpu_check.py runs the cuda cases


class Crash(Exception):
    pass


def crash_at(step):
    def callback(event):
        if event.kind == "step" and event.step == step:
            raise Crash()
    return callback


@pytest.mark.parametrize("device", DEVICES)
def test_resumed_run_ends_with_identical_weights(tmp_path, device):
    data, config = toy_data(), dataclasses.replace(CFG, device=device)  # on CUDA the RNG state comes back on the GPU
    full = Trainer(toy_model(), data, config, tmp_path / "full", val_data=data[:6]).fit()
    reference = load_model(tmp_path / "full" / "checkpoints" / "last")[0].state_dict()

    with pytest.raises(Crash):  # dies after step 5; the last checkpoint is from step 4
        Trainer(toy_model(), data, config, tmp_path / "cut", val_data=data[:6], callbacks=[crash_at(5)]).fit()
    meta, _, _ = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert meta["step"] == 4
    resumed = Trainer(toy_model(seed=123), data, config, tmp_path / "cut", val_data=data[:6]).fit(resume=True)
    assert resumed.step == full.step == 9
    got = load_model(tmp_path / "cut" / "checkpoints" / "last")[0].state_dict()
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    # the log too: one line per epoch, each epoch's loss over all its steps (before and after the crash)
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_events_metrics_file_and_best_checkpoint(tmp_path):
    events = []
    data = toy_data()
    result = Trainer(toy_model(), data, TrainConfig(epochs=2, batch_size=8, device="cpu", monitor="acc"), tmp_path,
                     val_data=data, callbacks=[events.append]).fit()
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 6 and kinds.count("epoch") == 2
    step = next(e for e in events if e.kind == "step")
    assert {"loss", "cls"} <= set(step.losses) and step.samples_per_s > 0 and step.total_steps == 6
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"auc", "acc", "f1_macro", "recall_per_class"} <= set(lines[0]["val"]["cls"])
    assert "mae" in lines[0]["val"]["reg"]
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").exists() and result.best is not None
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(toy_model(), data, TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()


def test_stop_request_saves_last_and_pause_resumes(tmp_path):
    control = RunControl()
    seen = []

    def callback(event):
        seen.append(event.kind)
        if event.kind == "step" and event.step == 1:
            control.pause()
            import threading
            threading.Timer(0.2, control.resume).start()
        if event.kind == "step" and event.step == 2:
            control.stop()

    result = Trainer(toy_model(), toy_data(), CFG, tmp_path, callbacks=[callback], control=control).fit()
    assert result.stopped and result.step == 2
    assert "paused" in seen and "resumed" in seen and seen[-1] == "stopped"
    assert load_checkpoint(tmp_path / "checkpoints" / "last")[0]["step"] == 2


def test_non_finite_loss_names_step_and_task_and_keeps_last_checkpoint(tmp_path):
    data = toy_data()

    def poison(event):
        if event.kind == "checkpoint" and event.step == 2:  # right after the step-2 checkpoint is written
            with torch.no_grad():
                trainer.model.heads["reg"].fc.weight.fill_(float("inf"))

    trainer = Trainer(toy_model(), data, CFG, tmp_path, callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match=r"step 3 in task\(s\) \[.*'reg'.*\]"):
        trainer.fit()
    meta, weights, _ = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert meta["step"] == 2 and all(torch.isfinite(w).all() for w in weights.values())


def test_checkpoint_errors_name_the_file(tmp_path):
    Trainer(toy_model(), toy_data(), TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()
    last = tmp_path / "checkpoints" / "last"
    # incompatible configuration
    other = toy_model(tasks=[TaskSpec("cls", "multiclass", 5)])
    from medexplore.train.checkpoint import load_into
    _, weights, _ = load_checkpoint(last)
    with pytest.raises(CheckpointError, match=r"incompatible with this model configuration: .*heads.cls.fc.weight"):
        load_into(other, weights, str(last))
    # corrupt weights and JSON
    (last / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable weights"):
        load_checkpoint(last)
    (last / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json: corrupt JSON"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="not a medexplore checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_training_state_loads_without_pickled_objects(tmp_path):
    Trainer(toy_model(), toy_data(), TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()
    state = torch.load(tmp_path / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)


def test_vicreg_mode_reduces_loss_without_labels(tmp_path):
    events = []
    unlabeled = [Sample(s.image, s.domain) for s in toy_data(32)]
    cfg = TrainConfig(mode="vicreg", epochs=4, batch_size=16, lr=2e-3, device="cpu", expander=(64, 64))
    Trainer(toy_model(tasks=[]), unlabeled, cfg, tmp_path, callbacks=[events.append]).fit()
    losses = [e.losses["loss"] for e in events if e.kind == "step"]
    assert len(losses) == 8 and all(map(lambda v: v == v, losses))
    assert {"invariance", "variance", "covariance"} <= set(next(e for e in events if e.kind == "step").losses)
    _, weights, _ = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert any(k.startswith("extra.net.") for k in weights)  # the expander is saved beside the model
    assert losses[-1] < losses[0]


def test_config_and_data_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainConfig(mode="dino")
    with pytest.raises(ValueError, match="divisible by accum_steps"):
        TrainConfig(batch_size=10, accum_steps=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1})
    with pytest.raises(ValueError, match="training dataset is empty"):
        Trainer(toy_model(), [], CFG, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
        Trainer(toy_model(), toy_data(), TrainConfig(device="cuda:0"), tmp_path)
    with pytest.raises(ValueError, match="unknown device 'gpu7'"):
        Trainer(toy_model(), toy_data(), TrainConfig(device="gpu7"), tmp_path)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    # every sample carries the one task, so the mean over two micro-batches is the full-batch mean
    data = [Sample(s.image, s.domain, {"cls": s.labels["cls"]}) for s in toy_data(16) if s.domain.dimensionality == "2d"][:8]
    cfg = dict(epochs=1, batch_size=8, lr=1e-3, device="cpu", clip_grad=None, augment=False)
    a = toy_model(tasks=TASKS[:1], drop_path_rate=0.0)
    b = toy_model(tasks=TASKS[:1], drop_path_rate=0.0)
    Trainer(a, data, TrainConfig(**cfg), tmp_path / "a").fit()
    Trainer(b, data, TrainConfig(**cfg, accum_steps=2), tmp_path / "b").fit()
    # entries whose true gradient is zero (e.g. key biases: softmax ignores a shift shared by all keys) get
    # a rounding-noise gradient that Adam scales up to +-lr; compare every entry with a real gradient
    real = [torch.zeros_like(pa, dtype=torch.bool) if pa.grad is None else pa.grad.abs() > 1e-7 for pa in a.parameters()]
    diffs = [(pa - pb)[m].abs().max().item() for pa, pb, m in zip(a.parameters(), b.parameters(), real) if m.any()]
    assert len(diffs) > 10 and max(diffs) < 1e-5


def test_augmentation_moves_masks_and_boxes_with_the_image():
    from medexplore.data.transforms import Augment
    image = torch.zeros(1, 8, 8)
    image[0, 2:4, 1:3] = 1.0
    mask = (image[0] > 0).long()
    boxes = torch.tensor([[2.0, 1.0, 4.0, 3.0]])
    flip_only = Augment(flip_p=1.0, crop_p=1.0, contrast=(1, 1), brightness=0.0, noise_std=0.0)
    out, labels = flip_only(image, {"m": mask, "b": boxes, "c": 1}, {"m": "mask", "b": "boxes"})
    assert torch.equal((out[0] > 0.5).long(), labels["m"])  # no crop: the sample has spatial labels
    assert labels["b"].tolist() == [[2.0, 5.0, 4.0, 7.0]] and labels["c"] == 1
    region = labels["m"][2:4, 5:7]
    assert region.all() and labels["m"].sum() == 4
    cropped, _ = Augment(crop_p=1.0, crop_scale=(0.5, 0.5))(image, {"c": 1}, {}, torch.Generator().manual_seed(0))
    assert cropped.shape == image.shape and not torch.equal(cropped, image)


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import medexplore.train.checkpoint as ckpt
    Trainer(toy_model(), toy_data(), TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()
    last = tmp_path / "checkpoints" / "last"
    before = (last / "model.safetensors").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/last \(No space left on device\); the previous"):
        ckpt.save_checkpoint(last, toy_model(seed=5), {"step": 99})
    assert (last / "model.safetensors").read_bytes() == before
    assert load_checkpoint(last)[0]["step"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]  # no temporary folder left


def test_label_balance_uses_labels_only(tmp_path):
    class CountingReads(list):
        reads = 0

        def __getitem__(self, i):
            CountingReads.reads += 1
            return list.__getitem__(self, i)

        def labels_of(self, i):
            return list.__getitem__(self, i).labels

    data = CountingReads([Sample(torch.zeros(1, 8, 8), Domain("2d"), {"cls": int(i < 3)}) for i in range(12)])
    trainer = Trainer(toy_model(tasks=TASKS[:1]), data, TrainConfig(batch_size=4, balance="label", device="cpu"), tmp_path)
    w = trainer.sampler.weights
    assert CountingReads.reads == 0  # weights come from labels_of, no image was read
    assert w[:3].sum().item() == pytest.approx(0.5) and w[3:].sum().item() == pytest.approx(0.5)


def test_crash_between_the_renames_of_a_save_is_recovered(tmp_path):
    import medexplore.train.checkpoint as ckpt

    Trainer(toy_model(), toy_data(), TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()
    last = tmp_path / "checkpoints" / "last"
    last.rename(last.with_name("last.old-123-abc"))  # killed after moving the old one away...
    (last.parent / "last.tmp-123-abc").mkdir()  # ...before moving the new one in
    assert load_checkpoint(last)[0]["step"] == 3  # the old one serves
    ckpt.save_checkpoint(last, toy_model(seed=5), {"step": 4})
    ckpt.recover_checkpoints(last.parent)  # what a resumed run does under its lock
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]  # and leftovers are cleared
    assert load_checkpoint(last)[0]["step"] == 4


def test_recover_checkpoints_restores_an_interrupted_rename_and_clears_temporaries(tmp_path):
    from medexplore.train.checkpoint import recover_checkpoints

    Trainer(toy_model(), toy_data(), TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path).fit()
    folder = tmp_path / "checkpoints"
    (folder / "best.tmp-8-dead").mkdir()  # a killed writer's half-written first save of "best"
    (folder / "last").rename(folder / "last.old-9-dead")  # and a save killed between its two renames
    (folder / "last.tmp-9-dead").mkdir()
    recover_checkpoints(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["last"]
    assert load_checkpoint(folder / "last")[0]["step"] == 3


def test_headline_monitor_averages_each_tasks_headline_metric():
    metrics = {"lesion": {"auc": 0.9, "acc": 0.1}, "mask": {"dice": 0.6}, "boxes": {"mean_iou": 0.2, "map@0.5": 0.3},
               "count": {"mae": 0.5}, "empty": {"auc": float("nan")}}
    assert monitor_value("headline", metrics) == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert monitor_value("auc", metrics) == pytest.approx(0.9)
    assert monitor_value("headline", {"count": {"mae": 0.5}}) is None


def test_uncertainty_weighting_known_answer_and_gradnorm_equalises_gradient_norms():
    from medexplore.train.balancing import GradNorm, UncertaintyWeighting, make_balancer

    assert make_balancer("fixed", {"a": 1.0}) is None
    with pytest.raises(ValueError, match="train.loss_balance must be one of"):
        make_balancer("equal", {"a": 1.0})
    uw = UncertaintyWeighting({"a": 1.0, "b": 2.0})
    with torch.no_grad():
        uw.log_variance.copy_(torch.tensor([0.0, 1.0]))
    total = uw.combine({"a": torch.tensor(3.0), "b": torch.tensor(4.0)}, [])
    assert total.item() == pytest.approx(3.0 + 2.0 * (4.0 * torch.exp(torch.tensor(-1.0)).item() + 1.0))
    # GradNorm: two tasks through one shared weight, task b's gradient 10x task a's; the weights move to even them
    shared = torch.nn.Parameter(torch.tensor([1.0]))
    gn = GradNorm({"a": 1.0, "b": 1.0}, alpha=0.0)
    opt = torch.optim.Adam(gn.parameters(), lr=0.01)  # as in training (AdamW)
    for _ in range(150):
        opt.zero_grad()
        losses = {"a": 1.0 * shared.sum(), "b": 10.0 * shared.sum()}
        total = gn.combine(losses, [shared])
        assert not total.requires_grad or total.grad_fn is not None
        opt.step()
        gn.after_step()
    w = gn.task_weight.detach()
    # equal norms |1 * w_a| = |10 * w_b| with w_a + w_b = 2: w = (1.82, 0.18)
    assert w.sum().item() == pytest.approx(2.0) and 7 < w[0] / w[1] < 14


def test_loss_balance_and_padded_packing_train_and_resume(tmp_path):
    data = toy_data()
    for balance in ("uncertainty", "gradnorm"):
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, device="cpu", monitor="acc", loss_balance=balance,
                          packing="padded")
        Trainer(toy_model(), data, cfg, tmp_path / balance, val_data=data[:6]).fit()
        meta, _, state = load_checkpoint(tmp_path / balance / "checkpoints" / "last")
        assert set(meta["loss_weights"]) == {"cls", "reg"} and "balancer" in state
        resumed = Trainer(toy_model(), data, TrainConfig(**{**cfg.to_dict(), "epochs": 3}), tmp_path / balance)
        assert resumed.fit(resume=True).step == 9
    with pytest.raises(ValueError, match="train.packing must be one of"):
        TrainConfig(packing="dense")


def test_event_kinds_are_an_enum_that_reads_as_text():
    from medexplore.train import Event, EventKind

    event = Event("step", 3)
    assert event.kind is EventKind.STEP and event.kind == "step" and f"{event.kind} at {event.step}" == "step at 3"
    with pytest.raises(ValueError):
        Event("stepp")


def test_the_trainer_is_assembled_from_parts(tmp_path):
    """The run's own callbacks are parts: without BestCheckpoint no ``best`` is written, without MetricsLog
    no metrics.jsonl, and the objective decides what is learned beside the model."""
    from medexplore.train.callbacks import EpochCheckpoint, PauseWhenAsked, StepCheckpoints
    from medexplore.train.objectives import SupervisedObjective, VICRegObjective

    data = toy_data()
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", monitor="acc")
    trainer = Trainer(toy_model(), data, cfg, tmp_path / "parts", val_data=data[:6],
                      run_callbacks=[StepCheckpoints(), PauseWhenAsked(), EpochCheckpoint()])
    assert isinstance(trainer.objective, SupervisedObjective) and trainer.objective.modules() == []
    result = trainer.fit()
    folder = tmp_path / "parts" / "checkpoints"
    assert result.step == 6 and (folder / "last").exists() and not (folder / "best").exists()
    assert not (tmp_path / "parts" / "metrics.jsonl").exists()
    vicreg = Trainer(toy_model(tasks=[]), data, TrainConfig(mode="vicreg", batch_size=8, device="cpu"), tmp_path / "v")
    assert isinstance(vicreg.objective, VICRegObjective)
    expander = {id(p) for p in vicreg.objective.expander.parameters()}
    optimised = {id(p) for group in vicreg.optimizer.param_groups for p in group["params"]}
    assert expander and expander <= optimised


def test_weight_average_is_what_validation_and_best_see_and_resumes_exactly(tmp_path):
    data = toy_data()
    one = Trainer(toy_model(), data, TrainConfig(epochs=1, batch_size=8, device="cpu", monitor="acc", ema_decay=0.9),
                  tmp_path / "one", val_data=data[:6])
    one.fit()  # one epoch: best is written at its end, from the average
    trained = load_model(tmp_path / "one" / "checkpoints" / "last")[0].state_dict()
    best = load_model(tmp_path / "one" / "checkpoints" / "best")[0].state_dict()
    assert all(torch.equal(best[k], one.average.shadow[k]) for k in best)
    assert any(not torch.equal(trained[k], best[k]) for k in trained)  # the average is not the last weights
    assert all(torch.equal(one.model.state_dict()[k], trained[k]) for k in trained)  # own weights back after use

    cfg = TrainConfig(**{**CFG.to_dict(), "ema_decay": 0.9})
    full = Trainer(toy_model(), data, cfg, tmp_path / "full", val_data=data[:6])
    full.fit()
    with pytest.raises(Crash):
        Trainer(toy_model(), data, cfg, tmp_path / "cut", val_data=data[:6], callbacks=[crash_at(5)]).fit()
    resumed = Trainer(toy_model(seed=123), data, cfg, tmp_path / "cut", val_data=data[:6])
    resumed.fit(resume=True)
    assert all(torch.equal(full.average.shadow[k], resumed.average.shadow[k]) for k in full.average.shadow)
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)


def test_evaluation_batches_of_large_volumes_are_capped():
    from medexplore.data.sampling import MixedDataset
    from medexplore.train.evaluate import capped_batch_size

    def volumes(side, n=2):
        return [Sample(torch.zeros(1, side, side, side), Domain("3d", "ct", "chest"), {}) for _ in range(n)]

    assert capped_batch_size(volumes(28), 256) == 256  # 256 x 28^3 is within the cap
    assert capped_batch_size(volumes(64), 256) == 64
    assert capped_batch_size(volumes(128), 256) == 8
    flat = [Sample(torch.zeros(1, 28, 28), Domain("2d", "xray", "chest"), {})] * 2
    assert capped_batch_size(MixedDataset({"flat": flat, "big": volumes(64)}), 256) == 64  # the largest part decides


def test_releasing_the_calling_threads_openmp_team_ends_only_its_helpers_and_the_next_op_rebuilds_it():
    from medexplore.train.openmp import _gnu_openmp, release_thread_team

    helpers = torch.get_num_threads() - 1
    if _gnu_openmp() is None or helpers < 1:
        pytest.skip("needs PyTorch on GNU OpenMP with at least 2 threads")

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    x = torch.rand(1_000_000)
    expected = float((x * 2).sum())
    computed, finish = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: ((x * 2).sum(), computed.set(), finish.wait()))  # keeps its own team
    other.start()
    computed.wait()
    try:
        (x * 2).sum()  # the main thread's team exists
        with_both = os_threads()
        assert release_thread_team()
        assert os_threads() == with_both - helpers  # the main thread's helpers only: the other team is untouched
        assert float((x * 2).sum()) == expected
        assert os_threads() == with_both  # rebuilt by the next parallel operation
    finally:
        finish.set()
        other.join()
