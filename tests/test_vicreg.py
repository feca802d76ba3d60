"""VICReg loss against a direct formula, collapse, expander, views and the differentiable gather."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medexplore.ssl import Expander, TwoViews, VICRegLoss, ViewAugment, gaussian_blur


def direct_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0, eps=1e-4):
    """The paper's formula written out with explicit loops."""
    n, d = z1.shape
    inv = sum(((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d))) / (n * d)
    var_terms, cov_terms = [], []
    for z in (z1, z2):
        mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        c = [[sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(n)) / (n - 1) for b in range(d)] for a in range(d)]
        var_terms.append(sum(max(0.0, 1 - (c[j][j] + eps) ** 0.5) for j in range(d)) / d)
        cov_terms.append(sum(c[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d)
    return sim * inv + std * (var_terms[0] + var_terms[1]) / 2 + cov * (cov_terms[0] + cov_terms[1])


def test_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.7, torch.randn(12, 5, generator=g, dtype=torch.float64)
    for coeffs in [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)]:
        loss = VICRegLoss(*coeffs)(z1, z2)
        expected = direct_vicreg(z1, z2, *coeffs)
        assert abs(loss.item() - float(expected)) < 1e-9


def test_constant_embeddings_are_penalised_as_collapse():
    loss_fn = VICRegLoss()
    collapsed = loss_fn.terms(torch.ones(32, 8), torch.ones(32, 8))
    assert collapsed["invariance"] == 0 and collapsed["covariance"] == 0
    assert collapsed["variance"].item() == pytest.approx(1 - 1e-2, rel=1e-5)
    spread = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 2
    assert loss_fn.terms(spread, spread)["variance"] == 0
    assert loss_fn(torch.ones(32, 8), torch.ones(32, 8)) > loss_fn(spread, spread)


def test_bad_embeddings_are_rejected():
    with pytest.raises(ValueError, match=r"equal shape, got \(4, 3\) and \(4, 2\)"):
        VICRegLoss()(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        VICRegLoss()(torch.zeros(1, 3), torch.zeros(1, 3))


def test_expander_structure():
    e = Expander(16, (32, 32, 8))
    kinds = [type(m).__name__ for m in e.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert e.net[-1].bias is None and e(torch.randn(5, 16)).shape == (5, 8)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16), (1, 8, 16, 12)])
def test_views_keep_shape_and_are_reproducible(shape):
    img = torch.rand(shape)
    v1 = TwoViews()(img, torch.Generator().manual_seed(3))
    v2 = TwoViews()(img, torch.Generator().manual_seed(3))
    assert v1[0].shape == img.shape and torch.equal(v1[0], v2[0]) and torch.equal(v1[1], v2[1])
    assert not torch.equal(v1[0], v1[1])
    constant = ViewAugment()(torch.ones(shape), torch.Generator().manual_seed(0))
    assert torch.isfinite(constant).all()


def test_gaussian_blur_preserves_mean_and_smooths():
    img = torch.zeros(1, 9, 9)
    img[0, 4, 4] = 1.0
    out = gaussian_blur(img, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out[0, 4, 4] < 0.2 and out[0, 4, 5] > 0


def _gather_worker(rank, world, init_file, z1_all, z2_all, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z1 = z1_all.chunk(world)[rank].clone().requires_grad_(True)
    z2 = z2_all.chunk(world)[rank].clone().requires_grad_(True)
    terms = VICRegLoss().terms(z1, z2)
    (25 * terms["variance"] + terms["covariance"]).backward()
    result[rank] = torch.cat([z1.grad, z2.grad], 1)
    dist.destroy_process_group()


def test_gather_is_differentiable_across_two_processes(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1_all, z2_all = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    ref1, ref2 = z1_all.clone().requires_grad_(True), z2_all.clone().requires_grad_(True)
    terms = VICRegLoss().terms(ref1, ref2)
    (25 * terms["variance"] + terms["covariance"]).backward()
    # a distributed backward returns each rank d(global loss)/d(local z), summed over ranks: world x single
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), z1_all, z2_all, result), nprocs=2, join=True)
    got = torch.cat([result[0], result[1]])
    expected = torch.cat([ref1.grad, ref2.grad], 1) * 2
    assert torch.allclose(got, expected, atol=1e-6)
