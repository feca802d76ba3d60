"""The analysis library: embeddings, projections, subspaces, mixing weights, attributions, Fisher spectra."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REGION, small_model

from medexplore import analysis as A
from medexplore.data.embedded import EmbeddedDataset
from medexplore.data.registry import dataset_tasks, vocab_for
from medexplore.data.sample import Sample, collate
from medexplore.models import Batch, Domain, TaskSpec, create_model
from medexplore.train.checkpoint import list_snapshots

XRAY = Domain("2d", "xray", "chest")


@pytest.fixture(scope="module")
def embedded_test():
    return EmbeddedDataset("test")


@pytest.fixture(scope="module")
def embedded_model(embedded_test):
    torch.manual_seed(0)
    return create_model("medformer_tiny", tasks=dataset_tasks(embedded_test), vocab=vocab_for(embedded_test),
                        embed_dim=32, depth=2, num_heads=2, patch_size=4).eval()


# ---------------------------------------------------------------------------- embeddings
def test_embeddings_rows_match_single_sample_forward_and_round_trip(tmp_path, embedded_test, embedded_model):
    subset = torch.utils.data.Subset(embedded_test, list(range(0, len(embedded_test), 7)))
    emb = A.compute_embeddings(embedded_model, subset, batch_size=5, blocks=True, progress=False, split="test")
    n = len(subset)
    assert emb.pooled.shape == (n, 32) and emb.blocks.shape == (n, 2, 32)
    assert set(emb.tasks) == set(embedded_model.tasks) and all(v.shape == (n, 32) for v in emb.tasks.values())
    meta = emb.metadata
    for column in ("dataset", "split", "modality", "body_part", "dimensionality", "patient_id", "label:lesion",
                   "pred:lesion", "correct:lesion", "error:lesion_count"):
        assert column in meta.columns
    assert set(meta["dimensionality"]) == {"2d", "3d"} and (meta["split"] == "test").all()
    # a sample's row does not depend on the batch it was packed in
    for row in (0, n - 1):
        sample = subset[row]
        with torch.no_grad():
            alone = embedded_model(collate([sample])).embedding[0].numpy()
        np.testing.assert_allclose(emb.pooled[row], alone, atol=1e-5)
        assert meta["label:lesion"][row] == sample.labels["lesion"]
        assert meta["correct:lesion"][row] == ((meta["pred:lesion"][row] > 0.5) == bool(sample.labels["lesion"]))
    path = emb.save(tmp_path / "emb.npz")
    back = A.load_embeddings(path)
    np.testing.assert_array_equal(back.pooled, emb.pooled)
    np.testing.assert_array_equal(back.blocks, emb.blocks)
    np.testing.assert_array_equal(back.features("task:lesion"), emb.tasks["lesion"])
    pd.testing.assert_frame_equal(back.metadata, meta, check_dtype=False)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_embeddings_bad_files_and_names(tmp_path, embedded_model, embedded_test):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        A.load_embeddings(bad)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        A.load_embeddings(tmp_path / "missing.npz")
    emb = A.compute_embeddings(embedded_model, [embedded_test[0], embedded_test[1]], progress=False)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        emb.save(tmp_path)
    with pytest.raises(KeyError, match="block:0"):
        emb.features("block:0")


# ---------------------------------------------------------------------------- projections
def test_pca_backends_agree_and_cache_hits(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) @ np.diag(np.linspace(5, 0.1, 20))
    a, b = A.pca(x, 3, "torch"), A.pca(x, 3, "sklearn")
    np.testing.assert_allclose(a.coords, b.coords, atol=1e-3)
    np.testing.assert_allclose(a.explained_variance_ratio, b.explained_variance_ratio, atol=1e-6)
    assert np.all(np.diff(a.explained_variance_ratio) <= 0)
    first = A.project(x, "pca", cache=tmp_path, n_components=2)
    second = A.project(x, "pca", cache=tmp_path, n_components=2)
    assert not first.cached and second.cached
    np.testing.assert_array_equal(first.coords, second.coords)
    assert not A.project(x, "pca", cache=tmp_path, n_components=3).cached  # other parameters, other entry
    assert not A.project(x + 1e-3, "pca", cache=tmp_path, n_components=2).cached  # other data, other entry
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[5\]"):
        A.pca(x)
    with pytest.raises(ValueError, match="method"):
        A.project(np.ones((5, 2)), "tsne")


def test_umap_separates_clusters_and_is_cached(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(12, 1, (60, 8))])
    first = A.project(x, "umap", cache=tmp_path, n_neighbors=10)
    coords = first.coords
    gap = np.linalg.norm(coords[:60].mean(0) - coords[60:].mean(0))
    assert gap > 3 * max(coords[:60].std(0).max(), coords[60:].std(0).max())
    again = A.project(x, "umap", cache=tmp_path, n_neighbors=10)
    assert again.cached and np.array_equal(again.coords, coords)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_neighbors_equal_scikit_learns_brute_force(metric):
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(1).normal(size=(700, 12)).astype(np.float32)
    x[5] = x[4]  # a duplicate: each of the two still lists itself first
    indices, dists = A.exact_neighbors(x, 8, metric)
    ref_dists, ref_indices = NearestNeighbors(n_neighbors=8, metric=metric, algorithm="brute").fit(x).kneighbors(x)
    assert indices.dtype == np.int32 and (indices[:, 0] == np.arange(700)).all() and (dists[:, 0] == 0).all()
    np.testing.assert_allclose(dists, ref_dists, atol=2e-3)
    agree = np.mean([len(set(a) & set(b)) / 7 for a, b in zip(indices[:, 1:], ref_indices[:, 1:])])
    assert agree > 0.99  # ties (the duplicate) may order differently
    with pytest.raises(ValueError, match="metric 'manhattan'"):
        A.exact_neighbors(x, 8, "manhattan")


def test_umap_takes_the_exact_graph_below_its_limit_and_approximates_above(monkeypatch):
    x = np.random.default_rng(0).normal(size=(200, 6))
    exact = A.umap(x, n_neighbors=10)
    assert exact.params["neighbors"] == "exact"
    from medexplore.analysis import projections

    monkeypatch.setattr(projections, "EXACT_KNN_MAX", 100)  # above it (or another metric): umap-learn's own search
    approximate = A.umap(x, n_neighbors=10)
    assert approximate.params["neighbors"] == "approximate" and approximate.coords.shape == exact.coords.shape


# ---------------------------------------------------------------------------- subspaces
def planted_embeddings(seed=0, d=40, n=150, shared=3, specific=2, groups=("ct", "mri", "xray")):
    """Embeddings whose groups share ``shared`` directions and own ``specific`` directions each."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, shared + specific * len(groups))))
    s = q[:, :shared]
    own = {g: q[:, shared + i * specific: shared + (i + 1) * specific] for i, g in enumerate(groups)}
    rows, names = [], []
    for g in groups:
        coeff_shared = rng.normal(0, 3, (n, shared))
        coeff_own = rng.normal(0, 2, (n, specific)) + np.array([4.0] + [0.0] * (specific - 1))
        rows.append(coeff_shared @ s.T + coeff_own @ own[g].T + rng.normal(0, 0.05, (n, d)))
        names += [g] * n
    meta = pd.DataFrame({"modality": names, "dimensionality": ["2d"] * len(names)})
    return np.concatenate(rows), meta, s, own


def test_subspace_analysis_recovers_planted_shared_and_specific_directions():
    x, meta, s, own = planted_embeddings()
    result = A.analyze_subspaces(x, meta, k=5, targets=["modality"])
    assert result.shared.shape[1] == 3
    assert A.principal_angles(result.shared, s).max() < 3
    for g, basis in own.items():
        assert result.specific[g].shape[1] == 2
        assert A.principal_angles(result.specific[g], basis).max() < 3
    # the groups' subspaces share 3 of 5 directions: angles 0,0,0,90,90 -> mean 36 degrees
    off_diagonal = result.angles.to_numpy()[~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, 36, atol=2)
    var = result.variance.set_index("modality")
    assert (var["shared"] > 0.6).all() and (var["specific"] > 0.2).all() and (var["residual"] < 0.02).all()
    decode = result.decodability.set_index("features")
    assert decode.loc["specific", "balanced_accuracy"] > 0.95  # the modality lives in the specific parts
    assert decode.loc["shared", "balanced_accuracy"] < 0.55  # and not in the shared one (chance 1/3)


def test_subspace_arguments_are_checked():
    x, meta, *_ = planted_embeddings(n=20)
    with pytest.raises(KeyError, match="site"):
        A.analyze_subspaces(x, meta, group="site")
    with pytest.raises(ValueError, match="at least 2"):
        A.analyze_subspaces(x, meta, min_samples=100)
    with pytest.raises(ValueError, match="do not match"):
        A.analyze_subspaces(x[:-1], meta)


# ---------------------------------------------------------------------------- mixing weights
def test_domain_attention_is_a_distribution_per_sample_and_per_token(embedded_model, embedded_test):
    samples = [embedded_test[i] for i in (0, 30, 60, len(embedded_test) - 1)]
    mixing = A.domain_attention(embedded_model, samples)
    assert mixing.weights.shape == (4, 12) and (mixing.weights >= 0).all()
    np.testing.assert_allclose(mixing.weights.sum(1), 1, atol=1e-5)
    assert list(mixing.by_group().columns) == ["dimensionality", "modality", "body_part"]
    summary = A.summarize_mixing(mixing, by="dimensionality")
    assert set(summary.index) == {"2d", "3d"} and summary[("n", "")].sum() == 4
    maps = A.domain_attention_maps(embedded_model, samples[-1])
    assert all(m.shape == samples[-1].image.shape[1:] for m in maps.values())
    np.testing.assert_allclose(sum(maps.values()), 1, atol=1e-5)  # every voxel's attention sums to 1


def test_summarize_mixing_serves_gate_weights():
    meta = pd.DataFrame({"modality": ["ct", "ct", "mri", "mri"]})
    gates = A.MixingWeights(np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]]), ["general", "medical"],
                            ["general", "medical"], meta)
    summary = A.summarize_mixing(gates, by="modality")
    np.testing.assert_allclose(summary.loc["ct", ("mean", "general")], 0.8)
    np.testing.assert_allclose(summary.loc["mri", ("std", "medical")], 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        A.MixingWeights(np.array([[-0.5, 1.5]]), ["a", "b"], ["a", "b"], meta.iloc[:1])


# ---------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("dims", [2, 3])
def test_token_map_values_sit_at_patch_centres(dims):
    grid, patch = (3,) * dims, 4
    ramp = torch.arange(3.0).reshape([3] + [1] * (dims - 1)).expand(grid)  # varies along the first axis
    image = A.token_map_to_image(ramp, tuple(g * patch for g in grid))
    centre = (np.arange(12) + 0.5) / patch - 0.5  # source coordinate of each pixel
    expected = np.clip(centre, 0, 2)
    profile = image.numpy()[(slice(None),) + (0,) * (dims - 1)]
    np.testing.assert_allclose(profile, expected, atol=1e-6)
    # the two pixels around patch 1's centre average to token 1 exactly
    assert profile[5] + profile[6] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="multiple"):
        A.token_map_to_image(ramp, tuple(g * patch + 1 for g in grid))


def _mass_in_region(values):
    values = np.abs(values)
    inside = np.zeros_like(values, dtype=bool)
    inside[REGION] = True
    return values[inside].sum() / values.sum()


def test_integrated_gradients_put_the_mass_where_the_answer_is(region_model):
    model, positives = region_model
    share = (8 * 8) / (32 * 32)
    for sample in positives:
        values = A.integrated_gradients(model, sample, "target", steps=16, nt_samples=2)
        assert values.shape == (32, 32)
        assert _mass_in_region(values) > 4 * share  # measured 0.57-0.66, the region is 0.06 of the image


def test_integrated_gradients_of_a_model_blind_outside_the_region_stay_inside_it(region_model, monkeypatch):
    model, positives = region_model
    keep = torch.zeros(1, 32, 32)
    keep[(slice(None),) + REGION] = 1
    # the same model made blind outside the region: its output is a function of the region alone
    patches = model.patch_embed.patches
    monkeypatch.setattr(model.patch_embed, "patches", lambda images: patches(images * keep.view(1, 1, 32, 32)))
    values = A.integrated_gradients(model, positives[0], "target", steps=16, noise_tunnel=False)
    assert _mass_in_region(values) > 0.999


def test_grad_cam_equals_the_definition(region_model):
    model, positives = region_model
    sample = positives[0]
    cam = A.grad_cam(model, sample, "target", block=0)
    store = {}

    def keep(module, args, output):
        output[0].retain_grad()
        store["x"] = output[0]

    handle = model.blocks[0].register_forward_hook(keep)
    model(Batch.from_images([sample.image], [XRAY])).predictions["target"][0].backward()
    handle.remove()
    tokens, grads = store["x"].detach(), store["x"].grad
    expected = torch.relu((tokens * grads.mean(0)).sum(-1)).reshape(8, 8)
    np.testing.assert_allclose(cam, A.token_map_to_image(expected, (32, 32)).numpy(), atol=1e-6)
    model.zero_grad()


def test_grad_cam_equals_captums_layer_grad_cam_on_a_batch(region_model):
    """Our Grad-CAM (read from a pass the caller runs, GradCamProbe) against captum's LayerGradCam on an
    identity layer that views the last block's patch tokens as a (B, D, 8, 8) grid."""
    from captum.attr import LayerGradCam

    from medexplore.analysis.attribution import task_outputs

    model, positives = region_model
    images = torch.stack([s.image for s in positives])
    domain = positives[0].domain
    ours = A.explain_images(model, images, domain, "grad_cam", task="target", target=0)
    grid_view, p = torch.nn.Identity(), model.num_prefix_tokens

    def as_grid(module, args, output):
        x, weights = output
        rows = x.reshape(len(images), p + 64, -1)
        tokens = grid_view(rows[:, p:].reshape(len(images), 8, 8, -1).movedim(-1, 1)).movedim(1, -1)
        return torch.cat([rows[:, :p], tokens.reshape(len(images), 64, -1)], 1).reshape(x.shape), weights

    def forward(x):
        prediction = model(Batch.from_images(x, [domain] * len(x)), tasks=["target"]).predictions["target"]
        return task_outputs(model, "target", prediction)  # (N, 1): the logit

    handle = model.blocks[-1].register_forward_hook(as_grid)
    try:
        cams = LayerGradCam(forward, grid_view).attribute(images, target=0, relu_attributions=True)
    finally:
        handle.remove()
    model.zero_grad()
    assert float(cams.detach().abs().max()) > 0
    for mine, theirs in zip(ours, cams.detach()):
        np.testing.assert_allclose(mine, A.token_map_to_image(theirs[0], (32, 32)).numpy(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # ours leaves no gradient behind


@pytest.mark.parametrize("dims", [2, 3])
def test_explaining_a_batch_of_windows_equals_explaining_each_alone(dims):
    model = small_model(tasks=[TaskSpec("grade", "multiclass", 4)])  # per-image default targets differ
    domain = XRAY if dims == 2 else Domain("3d", "mri", "brain")
    g = torch.Generator().manual_seed(3)
    images = torch.rand((3, 1) + (8,) * dims, generator=g)
    for method, options in (("rollout", {}), ("rollout", {"discard_ratio": 0.5, "head_fusion": "max"}),
                            ("attention", {"block": 1, "head": 2}), ("grad_cam", {})):
        batched = A.explain_images(model, images, domain, method, task="grade", **options)
        alone = [A.explain(model, Sample(image, domain), method, task="grade", **options).values for image in images]
        assert len(batched) == 3
        for b, a in zip(batched, alone):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    model.zero_grad()


@pytest.mark.parametrize("class_token", [False, True])
def test_rollout_equals_the_product_of_the_blocks_attention_read_along_its_row(class_token):
    """Known answer: Abnar & Zuidema's rollout as the full matrix product A_L ... A_1 of the head-fused,
    identity-added, row-normalised attentions, read along the class token's row or the mean of the patch rows."""
    model = small_model(tasks=[TaskSpec("presence", "binary", 1)], class_token=class_token)
    images, p = torch.rand(2, 1, 16, 16), model.num_prefix_tokens
    n = p + 16
    g = torch.Generator().manual_seed(5)
    attentions = [torch.randn(2, 3, n, n, generator=g).softmax(-1) for _ in model.blocks]
    for fusion, discard in (("mean", 0.0), ("max", 0.5)):
        product = torch.eye(n).expand(2, n, n)
        for attn in attentions:
            a = attn.mean(1) if fusion == "mean" else attn.max(1).values
            if discard:
                a = torch.where(a >= torch.quantile(a, discard, dim=-1, keepdim=True), a, torch.zeros_like(a))
            a = a + torch.eye(n)
            product = (a / a.sum(-1, keepdim=True)) @ product
        rows = product[:, :1] if class_token else product[:, p:]
        expected = rows.mean(1)[:, p:].reshape(2, 4, 4)
        ours = A.explain_images(model, images, XRAY, "rollout", attentions=attentions, head_fusion=fusion,
                                discard_ratio=discard)
        for mine, theirs in zip(ours, expected):
            np.testing.assert_allclose(mine, A.token_map_to_image(theirs, (16, 16)).numpy(), rtol=1e-5, atol=1e-7)


def test_rollout_of_uniform_attention_is_flat_and_maps_are_image_sized():
    model = small_model(tasks=[TaskSpec("presence", "binary", 1)])
    for block in model.blocks:  # queries and keys of zero: every token attends uniformly
        with torch.no_grad():
            block.attn.qkv.weight[:2 * block.attn.qkv.out_features // 3] = 0
            block.attn.qkv.bias[:2 * block.attn.qkv.out_features // 3] = 0
    for shape, domain in (((1, 16, 16), XRAY), ((1, 8, 16, 16), Domain("3d", "mri", "brain"))):
        sample = Sample(torch.rand(shape), domain)
        rollout = A.attention_rollout(model, sample)
        assert rollout.shape == shape[1:]
        np.testing.assert_allclose(rollout, rollout.mean(), rtol=1e-5)
        attention = A.attention_map(model, sample, block=0, head=1)
        np.testing.assert_allclose(attention, 1 / np.prod([s // 4 for s in shape[1:]]), rtol=1e-5)
        ig = A.explain(model, sample, "integrated_gradients", task="presence", steps=4, nt_samples=1)
        cam = A.explain(model, sample, "grad_cam", task="presence")
        assert ig.values.shape == cam.values.shape == shape[1:]


def test_attribution_arguments_are_checked(region_model):
    model, positives = region_model
    with pytest.raises(KeyError, match="nope"):
        A.grad_cam(model, positives[0], "nope")
    with pytest.raises(ValueError, match="block"):
        A.attention_map(model, positives[0], block=5)
    with pytest.raises(ValueError, match="method"):
        A.explain(model, positives[0], "lime")
    with pytest.raises(ValueError, match="task="):
        A.explain(model, positives[0], "grad_cam")
    with pytest.raises(ValueError, match="divisible|multiple|patch"):
        A.attention_rollout(model, Sample(torch.rand(1, 30, 30), XRAY))


# ---------------------------------------------------------------------------- Fisher spectra
def test_spectrum_summary_known_values():
    one = A.spectrum_summary(np.array([2.0, 0, 0]))
    assert one["dominant_ratio"] == 1 and one["spectral_entropy"] == 0
    flat = A.spectrum_summary(np.ones(4))
    assert flat["dominant_ratio"] == 0.25 and flat["spectral_entropy"] == pytest.approx(np.log(4))


def test_fisher_gram_spectrum_equals_dense_fisher_eigendecomposition():
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("a", "binary", 1), TaskSpec("b", "multiclass", 3)],
                         embed_dim=16, depth=1, num_heads=2, patch_size=4).eval()
    samples = [Sample(torch.randn(1, 8, 8), XRAY, {"a": i % 2, "b": i % 3}) for i in range(10)]
    samples.append(Sample(torch.randn(1, 8, 8), XRAY, {"a": 1}))  # a sample with one label only
    prefixes = ["blocks.0.attn.proj."]
    spectrum = A.fisher_spectrum(model, samples, prefixes, method="vmap")
    # dense reference: per-sample gradients by plain autograd, the full P x P Fisher, eigh
    params = A.select_parameters(model, prefixes)
    rows = []
    for s in samples:
        batch = collate([s])
        loss, _ = model.compute_loss(model(batch), batch)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    jac = torch.stack(rows).double()
    dense = torch.linalg.eigvalsh(jac.T @ jac / len(samples)).flip(0).numpy()
    assert spectrum.num_params == jac.shape[1] == 16 * 16 + 16
    np.testing.assert_allclose(spectrum.eigenvalues, dense[:len(samples)], rtol=1e-4, atol=1e-9)
    assert np.abs(dense[len(samples):]).max() < 1e-7  # rank <= N: the Gram matrix misses nothing
    loop = A.fisher_spectrum(model, samples, prefixes, method="loop")
    np.testing.assert_allclose(loop.eigenvalues, spectrum.eigenvalues, rtol=1e-4, atol=1e-9)


def test_fisher_over_kept_checkpoints(tmp_path):
    from medexplore.train.workflow import run_training

    config = {"model": {"name": "medformer_tiny", "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2},
              "data": {"datasets": ["embedded"]},
              "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "keep_every": 2, "device": "cpu",
                        "augment": False}}
    run_training(config, tmp_path / "run", test=False)
    snapshots = list_snapshots(tmp_path / "run")
    assert [step for step, _ in snapshots] == [2, 4]
    assert not (snapshots[0][1] / "train_state.pt").exists()  # weights only
    train = EmbeddedDataset("train")
    samples = [train[i] for i in range(0, 40, 5)]
    table = A.fisher_over_checkpoints(snapshots, samples, progress=False)
    assert list(table["step"]) == [2, 4]
    assert ((table["dominant_ratio"] > 0) & (table["dominant_ratio"] <= 1)).all()
    assert (table["spectral_entropy"] <= np.log(len(samples)) + 1e-9).all()
    with pytest.raises(ValueError, match="no parameter"):
        A.fisher_over_checkpoints(snapshots, samples, params=["nothing."], progress=False)


def test_iter_compute_embeddings_reports_progress_and_stops_when_asked(embedded_model, embedded_test):
    subset = [embedded_test[i] for i in range(7)]
    steps = A.iter_compute_embeddings(embedded_model, subset, batch_size=3)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            streamed = stop.value
            break
    assert progress == [(0, 7), (3, 7), (6, 7), (7, 7)]
    whole = A.compute_embeddings(embedded_model, subset, batch_size=3, progress=False)
    assert np.allclose(streamed.pooled, whole.pooled, atol=1e-6)
    cancelled = A.iter_compute_embeddings(embedded_model, subset, batch_size=3)
    next(cancelled), next(cancelled)
    cancelled.close()  # a GUI's cancel: nothing further is computed, the hooks are removed
    assert not embedded_model.output_adaptformer._forward_hooks
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        A.iter_compute_embeddings(embedded_model, subset, batch_size=0)  # checked before the first step


def test_prepare_image_checks_normalises_and_pads():
    from medexplore.data.transforms import normalize_intensity, prepare_image
    from medexplore.models import Domain

    domain = Domain("2d", "xray", "chest")
    image = np.random.default_rng(0).random((1, 10, 13)).astype(np.float32) * 200
    out = prepare_image(image, domain, pad_to=4)
    assert out.shape == (1, 12, 16) and torch.allclose(out[:, :10, :13], normalize_intensity(torch.from_numpy(image), "xray"))
    assert torch.equal(prepare_image(image, domain, normalize=False), torch.from_numpy(image))
    with pytest.raises(ValueError, match=r"a 2d image must have shape \(C, H, W\), got \(10, 13\)"):
        prepare_image(image[0], domain)
    image[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="image has 1 NaN/Inf values"):
        prepare_image(image, domain)
