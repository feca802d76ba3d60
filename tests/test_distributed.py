"""DDP on CPU (gloo): two processes end with the weights of one process on the same global batches."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medexplore.data import Sample
from medexplore.models import Domain, TaskSpec, create_model
from medexplore.train import TrainConfig, Trainer, load_model

CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, device="cpu", clip_grad=1.0, augment=False)  # draws differ per rank


def data():
    g = torch.Generator().manual_seed(0)
    return [Sample(torch.randn(1, 8, 8, generator=g) + i % 3, Domain("2d", "xray", "chest"), {"cls": i % 3})
            for i in range(32)]


def model():
    torch.manual_seed(0)
    # float64, so that reduction-order rounding (which Adam amplifies for tiny gradients) stays far
    # below the tolerance, while a wrong shard or gradient average would show at the scale of lr
    return create_model("medformer_tiny", tasks=[TaskSpec("cls", "multiclass", 3)], embed_dim=24, depth=2,
                        num_heads=2, patch_size=4).double()


def _worker(rank, init_file, run_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Trainer(model(), data(), CFG, run_dir).fit()
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    Trainer(model(), data(), CFG, tmp_path / "single").fit()
    mp.spawn(_worker, args=(str(tmp_path / "init"), tmp_path / "ddp"), nprocs=2, join=True)
    single = load_model(tmp_path / "single" / "checkpoints" / "last")[0].state_dict()
    ddp = load_model(tmp_path / "ddp" / "checkpoints" / "last")[0].state_dict()
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 1e-9, worst
    assert any((single[k] != model().state_dict()[k]).any() for k in single)  # training moved the weights


def test_torchrun_cli_two_processes(tmp_path):
    """The README's torchrun command, on the embedded data's smallest setting."""
    import subprocess
    import sys

    from conftest import write_npz
    npz = write_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist", n=(16, 8, 8))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "medexplore.cli", "train",
           "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "run"), "--quiet",
           "--set", "model.depth=1", "--set", "model.embed_dim=24", "--set", "model.num_heads=2",
           "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "test_metrics.json").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1  # written once, by rank 0
