"""Packed == alone == padded, timm parity, the rotary shift property and the fused rotation."""
import pytest
import timm
import torch
from conftest import small_model

from medexplore.models import Batch, Domain, load_timm_weights
from medexplore.models.blocks import Block
from medexplore.models.layout import conv_layout
from medexplore.models.packing import TokenLayout
from medexplore.models.rope import Rotary3D, rotate_qkv
from medexplore.models.segmentation import MultiScaleDecoder


def _assert_close(a, b, tol=1e-5):
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


@pytest.mark.parametrize("stem, patch_size_3d, stem_norm", [
    ("patch", None, "group"), ("conv", None, "group"), ("patch", 8, "group"), ("conv", 8, "group"), ("conv", None, "batch"),
    ("conv", None, "instance")])
def test_packed_forward_equals_each_sample_alone(stem, patch_size_3d, stem_norm, mixed_batch):
    model = small_model(stem=stem, patch_size_3d=patch_size_3d, stem_norm=stem_norm, layer_scale=0.1)
    packed = model(mixed_batch)
    p3 = patch_size_3d or 4
    assert {g.image_shape: g.grid for g in packed.layout.groups} == {
        (16, 16): (4, 4), (16, 16, 16): (16 // p3,) * 3, (8, 8, 8): (8 // p3,) * 3}
    for i in range(mixed_batch.num_samples):
        g = next(g for g, ids in enumerate(mixed_batch.group_samples) if i in ids.tolist())
        row = mixed_batch.group_samples[g].tolist().index(i)
        alone = model(Batch.from_images([mixed_batch.groups[g][row]], [mixed_batch.domains[i]]))
        _assert_close(packed.embedding[i], alone.embedding[0])
        for name in ("organ", "grade", "size"):
            _assert_close(packed.predictions[name][i], alone.predictions[name][0])
        _assert_close(packed.predictions["lesions"]["boxes"][i], alone.predictions["lesions"]["boxes"][0], 1e-4)
        (_, seg_alone), = alone.predictions["tissue"]
        seg_packed = {s: lg for ids, logits in packed.predictions["tissue"] for s, lg in zip(ids.tolist(), logits)}
        _assert_close(seg_packed[i], seg_alone[0], 1e-4)


def test_padded_path_equals_grouped(model, mixed_batch):
    grouped, padded = model(mixed_batch, packing="grouped"), model(mixed_batch, packing="padded")
    assert padded.layout.num_tokens > grouped.layout.num_tokens
    _assert_close(grouped.embedding, padded.embedding)
    for name in ("presence", "organ", "findings", "grade", "size"):
        _assert_close(grouped.predictions[name], padded.predictions[name])
    g_loss, _ = model.compute_loss(grouped, mixed_batch)
    p_loss, _ = model.compute_loss(padded, mixed_batch)
    _assert_close(g_loss, p_loss, 1e-4)


def test_attention_never_crosses_samples(model):
    a, b = torch.rand(1, 16, 16), torch.rand(1, 16, 16)
    domain = Domain("2d", "xray", "chest")
    first = model(Batch.from_images([a, b], domain)).embedding[0]
    changed = model(Batch.from_images([a, b * 100 + 5], domain)).embedding[0]
    assert torch.equal(first, changed)


def test_group_layout_is_block_diagonal():
    layout = TokenLayout.build([(2, 2), (2, 2, 2)], [torch.tensor([1, 2]), torch.tensor([0])],
                               [(8, 8), (8, 8, 8)], num_samples=3, max_padding=0.0)
    assert [(s.start, s.batch, s.length) for s in layout.segments] == [(0, 2, 4), (8, 1, 8)]
    assert layout.sample_idx.tolist() == [1] * 4 + [2] * 4 + [0] * 8
    assert layout.coords[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert layout.coords[-1].tolist() == [1, 1, 1]


@pytest.mark.parametrize("img_size, patch, in_chans, layer_scale", [(28, 4, 3, None), (32, 8, 1, None), (28, 4, 3, 0.1)])
def test_timm_vit_parity(img_size, patch, in_chans, layer_scale):
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=48, depth=3, num_heads=3, num_classes=5,
        init_values=layer_scale).eval()
    with torch.no_grad():  # make every parameter non-trivial, so a wrong mapping cannot pass
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    grid = img_size // patch
    model = small_model([], in_chans=in_chans, depth=3, patch_size=patch, pos_embed="learned", pos_grid=(1, grid, grid),
                        class_token=True, input_adaptformer=False, output_adaptformer=False, layer_scale=layer_scale)
    missing, _ = load_timm_weights(model, vit.state_dict())
    assert missing == []
    images = torch.randn(4, in_chans, img_size, img_size)
    expected = vit.forward_features(images)
    out = model(Batch.from_images(images, Domain("2d")))
    got = out.tokens.reshape(4, 1 + grid * grid, -1)
    _assert_close(got, expected)
    _assert_close(out.embedding, expected[:, 0])
    # the inflated 3D kernel embeds a stack of identical slices like the slice itself
    stack = images[:1, :, None].expand(-1, -1, patch, -1, -1)
    _assert_close(model.patch_embed(stack), model.patch_embed(images[:1]))


def test_timm_weights_resample_to_another_grid():
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)
    model = small_model([], depth=1, patch_size=8, pos_embed="learned", pos_grid=(1, 6, 6), class_token=True)
    load_timm_weights(model, vit.state_dict())
    assert tuple(model.pos.pos_embed.shape) == (1, 37, 48)
    with pytest.raises(ValueError, match="lack body parameters"):
        load_timm_weights(model, {k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.0.mlp")})


def test_rotary_shift_leaves_attention_unchanged():
    torch.manual_seed(0)
    block = Block(48, 3).eval()
    rope = Rotary3D(16)
    grids, ids = [(3, 4), (2, 3, 2)], [torch.tensor([0]), torch.tensor([1])]
    layout = TokenLayout.build(grids, ids, [(12, 16), (8, 12, 8)], num_samples=2)
    x = torch.randn(layout.num_tokens, 48)
    base, w_base = block(x, layout, rope(layout.coords), need_weights=True)
    shifted_coords = layout.coords + torch.tensor([5, -3, 11])
    shifted, w_shift = block(x, layout, rope(shifted_coords), need_weights=True)
    _assert_close(base, shifted, 1e-4)
    for a, b in zip(w_base, w_shift):
        _assert_close(a, b)
    # and positions do matter: permuting coordinates changes attention
    permuted, _ = block(x, layout, rope(layout.coords.flip(0)), need_weights=True)
    assert (permuted - base).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["grouped", "padded"])
def test_block_output_is_the_same_with_and_without_attention_weights(mode):
    """Asking for the weights (rollout, attention maps) computes the output from them instead of the fused
    kernel: the same attention, padded keys masked either way."""
    torch.manual_seed(0)
    block = Block(48, 3).eval()
    rope = Rotary3D(16)
    layout = TokenLayout.build([(3, 4), (2, 3, 3)], [torch.tensor([0, 2]), torch.tensor([1])],
                               [(12, 16), (8, 12, 12)], num_samples=3, mode=mode)
    assert any(seg.key_mask is not None for seg in layout.segments)  # 12 and 18 tokens: padded keys are masked
    x = torch.randn(layout.num_tokens, 48)
    fused, none = block(x, layout, rope(layout.coords))
    explicit, weights = block(x, layout, rope(layout.coords), need_weights=True)
    _assert_close(fused, explicit)
    assert none == [] and len(weights) == len(layout.segments)


def _rotate_half_reference(qkv, coords, freqs):
    """RoFormer's rotate-half rotation of queries and keys, written out in float64."""
    angles = coords.double() @ freqs.double()
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    half = qkv.shape[-1] // 2
    rotated = [t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin for t in qkv[:, :2].double().unbind(1)]
    return torch.stack([*rotated, qkv[:, 2].double()], 1)


def test_fused_rotation_equals_rotate_half_and_its_gradient_is_the_inverse():
    torch.manual_seed(0)
    rope = Rotary3D(16)
    coords = torch.randint(-6, 9, (7, 3))
    cos, sin = (t.double() for t in rope(coords))
    qkv = torch.randn(7, 3, 2, 16, dtype=torch.double, requires_grad=True)
    rotated = rotate_qkv(qkv, cos, sin)
    _assert_close(rotated, _rotate_half_reference(qkv, coords, rope.freqs), 1e-6)
    assert torch.equal(rotated[:, 2], qkv[:, 2])  # values pass unchanged
    assert torch.autograd.gradcheck(lambda t: rotate_qkv(t, cos, sin), (qkv,))
    # a rotation's gradient is the rotation back: rotating then pulling the gradient back is the identity
    grad, = torch.autograd.grad(rotated, qkv, rotated)
    _assert_close(grad, qkv, 1e-6)  # the tables are float32: cos^2 + sin^2 = 1 to ~1e-7
    # per-sample gradients (torch.func, as the Fisher spectra use) match a loop
    loss = lambda t: rotate_qkv(t, cos, sin).pow(3).sum()  # noqa: E731
    stack = torch.randn(4, 7, 3, 2, 16, dtype=torch.double)
    looped = torch.stack([torch.func.grad(loss)(t) for t in stack])
    _assert_close(torch.func.vmap(torch.func.grad(loss))(stack), looped, 1e-10)


def test_rope_model_serves_any_size(model):
    for size in (8, 12, 32):
        assert torch.isfinite(model(Batch.from_images([torch.rand(1, size, size)], Domain("2d"))).embedding).all()


def test_timm_variants_map_or_refuse_clearly():
    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3, num_classes=0)
    # no_embed_class: the class token carries no position; it maps exactly
    vit = timm.models.vision_transformer.VisionTransformer(no_embed_class=True, **kwargs).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = small_model([], depth=1, patch_size=4, pos_embed="learned", pos_grid=(1, 4, 4), class_token=True,
                        input_adaptformer=False, output_adaptformer=False)
    load_timm_weights(model, vit.state_dict())
    images = torch.randn(2, 3, 16, 16)
    got = model(Batch.from_images(images, Domain("2d"))).tokens.reshape(2, 17, -1)
    _assert_close(got, vit.forward_features(images))
    for options, message in (({"reg_tokens": 4}, "register tokens"),
                             ({"global_pool": "avg", "fc_norm": True}, "global_pool='avg'"),
                             ({"class_token": False, "global_pool": "avg", "fc_norm": False}, "has no class token"),
                             ({"init_values": 1e-5}, "has LayerScale \\(init_values\\) but the model was built with "
                                                     "layer_scale=None")):
        other = timm.models.vision_transformer.VisionTransformer(**{**kwargs, **options})
        with pytest.raises(ValueError, match=message):
            load_timm_weights(model, other.state_dict())
    wider = timm.models.vision_transformer.VisionTransformer(**{**kwargs, "embed_dim": 96})
    with pytest.raises(ValueError, match="do not fit this model"):
        load_timm_weights(model, wider.state_dict())


def test_equal_token_counts_share_a_segment_and_nearby_counts_pad_a_little():
    layout = TokenLayout.build([(4, 8), (8, 4), (2, 4, 4)], [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])],
                               [(16, 32), (32, 16), (8, 16, 16)], num_samples=3)
    assert [(s.batch, s.length, s.key_mask is None) for s in layout.segments] == [(3, 32, True)]
    grids = [(h, w) for h, w in zip(range(4, 12), range(5, 13))]  # 20, 30, ..., 132 tokens: every count differs
    layout = TokenLayout.build(grids, [torch.tensor([i]) for i in range(len(grids))], [(4 * h, 4 * w) for h, w in grids],
                               num_samples=len(grids))
    real = sum(h * w for h, w in grids)
    padded = sum(s.batch * s.length for s in layout.segments)
    assert len(layout.segments) < len(grids) and padded <= 1.5 * real
    assert layout.num_tokens == real and (layout.sample_idx >= 0).all()  # the sequence itself holds no padding
    x = torch.randn(real, 6, 8)
    for seg, rows in zip(layout.segments, layout.segment_rows(x)):  # rows gather the segment's tokens in order
        assert torch.equal(seg.from_rows(rows), x[seg.start:seg.stop])


def test_all_different_shapes_packed_equal_each_alone(model):
    shapes = [(1, 8, 12), (1, 12, 8), (1, 8, 16), (1, 12, 12), (1, 16, 12), (1, 4, 8, 8), (1, 8, 8, 4)]
    images = [torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    domains = [Domain("2d", "xray", "chest") if len(s) == 3 else Domain("3d", "mri", "brain") for s in shapes]
    packed = model(Batch.from_images(images, domains))
    assert len(packed.layout.segments) < len(shapes)
    for i, (img, dom) in enumerate(zip(images, domains)):
        alone = model(Batch.from_images([img], [dom]))
        _assert_close(packed.embedding[i], alone.embedding[0])
        _assert_close(packed.predictions["organ"][i], alone.predictions["organ"][0])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_attention_equals_per_segment_attention(device):
    """The CUDA path (one nested-jagged SDPA call for the batch), checked on CPU too (SDPA's math kernel)."""
    torch.manual_seed(0)
    grids = [(2, 3), (3, 3), (2, 2, 2), (4, 5), (3, 2), (2, 3, 3)]
    layout = TokenLayout.build(grids, [torch.tensor([i]) for i in range(len(grids))],
                               [tuple(4 * s for s in g) for g in grids], num_samples=len(grids), num_prefix=1,
                               device=device)
    assert len(layout.segments) > 1 and any(seg.gather is not None for seg in layout.segments)
    q, k, v = (torch.randn(layout.num_tokens, 3, 16, device=device, requires_grad=True) for _ in range(3))
    dense, _ = layout.self_attention(q, k, v, varlen=False)
    jagged, _ = layout.self_attention(q, k, v, varlen=True)
    torch.testing.assert_close(jagged, dense, atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for g_jagged, g_dense in zip(torch.autograd.grad(jagged.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(g_jagged, g_dense, atol=2e-5, rtol=1e-4)
    padded = TokenLayout.build(grids, [torch.tensor([i]) for i in range(len(grids))],
                               [tuple(4 * s for s in g) for g in grids], num_samples=len(grids), mode="padded")
    with pytest.raises(ValueError, match="compact layout"):
        padded.self_attention(*(torch.randn(padded.num_tokens, 3, 16) for _ in range(3)), varlen=True)


def test_timm_positions_extend_along_z_so_loaded_weights_take_volumes():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3,
                                                           num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    flat = small_model([], depth=1, patch_size=4, pos_embed="learned", pos_grid=(1, 4, 4), class_token=True,
                       input_adaptformer=False, output_adaptformer=False).eval()
    deep = small_model([], depth=1, patch_size=4, pos_embed="learned", pos_grid=(3, 4, 4), class_token=True,
                       input_adaptformer=False, output_adaptformer=False).eval()
    for model in (flat, deep):
        load_timm_weights(model, vit.state_dict())
    table = deep.pos.pos_embed[0, 1:].reshape(3, 16, -1)
    assert all(torch.equal(table[z], vit.pos_embed[0, 1:]) for z in range(3))  # every slice: timm's 2D positions
    images = torch.randn(2, 3, 16, 16)
    _assert_close(deep(Batch.from_images(images, Domain("2d"))).tokens, flat(Batch.from_images(images, Domain("2d"))).tokens)
    volume = model(Batch.from_images([torch.randn(1, 12, 16, 16)], Domain("3d")))  # 3 tokens deep: runs
    assert volume.tokens.shape[0] == 1 + 3 * 16
    with pytest.raises(ValueError, match="exceeds the learned position grid"):
        flat(Batch.from_images([torch.randn(1, 8, 16, 16)], Domain("3d")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention is the default on CUDA only")
def test_cuda_default_varlen_model_equals_each_sample_alone():
    grids = [(2, 3), (3, 3), (2, 2, 2), (4, 5), (3, 2), (2, 3, 3)]
    model = small_model([]).cuda().eval()
    images = [torch.rand(1, *(4 * s for s in g), device="cuda") for g in grids]
    domains = [Domain(f"{len(g)}d") for g in grids]
    with torch.no_grad():
        packed = model(Batch.from_images(images, domains)).embedding
        alone = torch.cat([model(Batch.from_images([img], [dom])).embedding for img, dom in zip(images, domains)])
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_flip_averaging_means_image_level_outputs_and_leaves_masks_and_boxes(model, mixed_batch):
    """Test-time flips: every vector output is the mean of the model on the images and on their mirrors
    (checked against two plain forwards); segmentation and detection come from the images as given."""
    import dataclasses

    from medexplore.models.kinds import KINDS
    from medexplore.train.evaluate import flip_averaged

    with torch.no_grad():
        plain = model(mixed_batch).predictions
        mirrored = model(dataclasses.replace(mixed_batch, groups=[g.flip(-1) for g in mixed_batch.groups])).predictions
        averaged = flip_averaged(model, mixed_batch)
    vector_tasks = [n for n, spec in model.tasks.items() if KINDS[spec.kind].output == "vector"]
    assert set(vector_tasks) == {"presence", "organ", "findings", "grade", "size"}
    for name in vector_tasks:
        assert not torch.allclose(plain[name], mirrored[name])  # the mirror is a different input
        torch.testing.assert_close(averaged[name], (plain[name] + mirrored[name]) / 2)
    for name in ("tissue", "lesions"):
        torch.testing.assert_close(averaged[name], plain[name])


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_channels_last_convolutions_equal_the_default_layout_forward_and_backward(stem, mixed_batch):
    """The decoders run channels-last by default (faster on CPU); values and gradients are those of
    PyTorch's default layout up to float rounding, and the decoders really do run channels-last."""
    model = small_model(stem=stem, stem_norm="instance")
    read = []  # per 3x3 decoder convolution called: was its input channels-last?
    for module in model.modules():
        if isinstance(module, MultiScaleDecoder):
            for conv in [block[0] for block in module.fuse] + [module.head[0][0]]:
                conv.register_forward_pre_hook(lambda m, args: read.append(args[0].is_contiguous(
                    memory_format=torch.channels_last_3d if args[0].dim() == 5 else torch.channels_last)))
    runs, layouts = {}, {}
    for flag in (False, True):
        read.clear()
        model.zero_grad(set_to_none=True)
        with conv_layout(flag):
            out = model(mixed_batch)
            loss, _ = model.compute_loss(out, mixed_batch)
            loss.backward()
        layouts[flag] = list(read)
        runs[flag] = out, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (plain, plain_loss, plain_grads), (fast, fast_loss, fast_grads) = runs[False], runs[True]
    _assert_close(plain_loss, fast_loss, 1e-5)
    _assert_close(plain.embedding, fast.embedding)
    for (ids, a), (_, b) in zip(plain.predictions["tissue"], fast.predictions["tissue"]):
        _assert_close(a, b, 1e-4)
    assert len(layouts[True]) >= 6 and all(layouts[True])  # 2D and 3D decoders, every level
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        _assert_close(grad, fast_grads[name], 1e-4 * max(1.0, grad.abs().max().item()))
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        with conv_layout("yes"):
            pass


def test_concat_channels_equals_cat_and_is_written_channels_last():
    from medexplore.models.layout import concat_channels

    a = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(2, 2, 4, 5, 6)  # default layout: what a normalisation or an upsampling hands over
    joined = concat_channels([a, b])
    assert torch.equal(joined, torch.cat([a, b], 1))
    assert joined.is_contiguous(memory_format=torch.channels_last_3d)
    with conv_layout(False):
        assert concat_channels([a, b]).is_contiguous()
    a.requires_grad_()  # where autograd records: the plain cat, then the reorder (values the same)
    recorded = concat_channels([a, b])
    assert torch.equal(recorded, joined) and recorded.is_contiguous(memory_format=torch.channels_last_3d)
    recorded.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))
    flat = [torch.randn(2, 3), torch.randn(2, 1)]  # neither 4D nor 5D: a plain cat
    assert torch.equal(concat_channels(flat), torch.cat(flat, 1))
