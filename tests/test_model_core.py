"""Shapes, gradients, missing labels, errors and output structure of the Medformer."""
import math

import pytest
import torch
from conftest import ALL_KIND_TASKS, full_labels, image, small_model

from medexplore.models import Batch, Domain, LabelError, MedformerConfig, TaskSpec, create_model, list_models
from medexplore.models.adaptformer import OutputAdaptformer
from medexplore.models.heads import OrdinalHead
from medexplore.models.kinds import HeadDims, kind_entry
from medexplore.models.packing import TokenLayout


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("task", ALL_KIND_TASKS, ids=lambda t: t.kind.value)
def test_prediction_shapes_for_every_kind(dims, task):
    model = small_model([task])
    size, n = 16, 2
    domain = Domain(f"{dims}d", "mri", "brain")
    batch = Batch.from_images([image(dims, size, seed=i) for i in range(n)], domain,
                              {task.name: [full_labels(dims, size, seed=i)[task.name] for i in range(n)]})
    out = model(batch)
    pred = out.predictions[task.name]
    k = task.num_outputs
    expected = {"binary": (n,), "multiclass": (n, k), "multilabel": (n, k), "ordinal": (n, k - 1), "regression": (n, k)}
    if task.kind.value in expected:
        assert tuple(pred.shape) == expected[task.kind.value]
    elif task.kind.value == "segmentation":
        (ids, logits), = pred
        assert tuple(logits.shape) == (n, k) + (size,) * dims and ids.tolist() == [0, 1]
    else:
        assert len(pred["boxes"]) == n and tuple(pred["boxes"][0].shape) == (k, 2 * dims)
        assert tuple(pred["logits"].shape) == (n, k)
        assert pred["boxes"][0].min() >= 0 and pred["boxes"][0].max() <= size
    assert tuple(out.embedding.shape) == (n, model.config.embed_dim)
    loss, per_task = model.compute_loss(out, batch)
    assert torch.isfinite(loss) and set(per_task) == {task.name}


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_every_parameter_gets_a_gradient(stem, mixed_batch):
    model = small_model(stem=stem).train()
    loss, per_task = model.compute_loss(model(mixed_batch), mixed_batch)
    assert set(per_task) == {t.name for t in ALL_KIND_TASKS}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_missing_labels_are_masked_per_task(model, mixed_batch):
    out = model(mixed_batch)
    _, full = model.compute_loss(out, mixed_batch)
    # drop the organ label of samples 1..4: the loss must equal the loss on sample 0 alone
    partial = Batch(mixed_batch.groups, mixed_batch.group_samples, mixed_batch.domains,
                    {"organ": [mixed_batch.targets["organ"][0], None, None, None, None]})
    _, per_task = model.compute_loss(out, partial)
    logits = out.predictions["organ"][0:1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([mixed_batch.targets["organ"][0]]))
    assert torch.allclose(per_task["organ"], expected)
    assert set(per_task) == {"organ"} and full["organ"] != per_task["organ"]


def test_task_absent_from_whole_batch_adds_zero_and_no_nan(model, mixed_batch):
    model.train()
    none = Batch(mixed_batch.groups, mixed_batch.group_samples, mixed_batch.domains,
                 {t.name: [None] * mixed_batch.num_samples for t in ALL_KIND_TASKS})
    loss, per_task = model.compute_loss(model(none), none)
    assert per_task == {} and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    nan_only = Batch(mixed_batch.groups, mixed_batch.group_samples, mixed_batch.domains,
                     {"size": [torch.tensor([math.nan, math.nan])] + [None] * 4})
    loss, per_task = model.compute_loss(model(nan_only), nan_only)
    assert per_task == {} and torch.isfinite(loss)


def test_constant_images_give_finite_outputs():
    model = small_model()
    for value in (0.0, 1.0, 1000.0):
        images = [torch.full((1, 16, 16), value), torch.full((1, 8, 8, 8), value)]
        labels = [full_labels(2, 16), full_labels(3, 8)]
        batch = Batch.from_images(images, [Domain("2d"), Domain("3d")],
                                  {k: [lab[k] for lab in labels] for k in labels[0]})
        out = model(batch)
        loss, _ = model.compute_loss(out, batch)
        assert torch.isfinite(out.embedding).all() and torch.isfinite(loss)


def test_input_adaptformer_attention_and_unknown_domain(model):
    batch = Batch.from_images([image(2), image(2)], [Domain("2d", "xray", "chest"), Domain("2d", "pet", "knee")])
    out = model(batch, return_attention=True)
    assert tuple(out.input_attention.shape) == (out.layout.num_tokens, 3 * model.config.domain_latents)
    assert torch.allclose(out.input_attention.sum(-1), torch.ones(out.layout.num_tokens), atol=1e-5)
    assert model.domain_index(batch).tolist() == [[0, 1, 1], [0, 0, 0]]  # pet/knee fall back to unknown


def test_extend_domains_keeps_old_outputs_and_is_saved(model):
    batch = Batch.from_images([image(2)], [Domain("2d", "xray", "chest")])
    before = model(batch).embedding
    vocab = model.extend_domains(modalities=["pet"], body_parts=["knee"])
    assert vocab.modality_index("pet") == 4 and model.spec_dict()["config"]["vocab"]["modalities"][-1] == "pet"
    assert torch.equal(model(batch).embedding, before)
    # a new domain starts from the unknown latents
    new = Batch.from_images([image(2)], [Domain("2d", "pet", "knee")])
    unknown = Batch.from_images([image(2)], [Domain("2d", "spect", "hand")])
    assert torch.allclose(model(new).embedding, model(unknown).embedding)
    rebuilt = type(model).from_spec_dict(model.spec_dict())
    rebuilt.load_state_dict(model.state_dict())


def test_attention_on_request_does_not_change_outputs(model, mixed_batch):
    """To float rounding: with weights asked for, each block's output is computed from them, not by the fused kernel."""
    plain = model(mixed_batch)
    full = model(mixed_batch, return_attention=True)
    torch.testing.assert_close(plain.embedding, full.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.predictions["organ"], full.predictions["organ"], rtol=1e-5, atol=1e-5)
    assert len(full.attentions) == model.config.depth
    for seg_weights, seg in zip(full.attentions[0], full.layout.segments):
        assert tuple(seg_weights.shape) == (seg.batch, model.config.num_heads, seg.length, seg.length)
        assert torch.allclose(seg_weights.sum(-1), torch.ones(()), atol=1e-5)
    w = full.query_attention["lesions"][2]  # 3D sample, 4x4x4 tokens, 3 box queries
    assert tuple(w.shape) == (model.config.num_heads, 3, 64)
    assert plain.attentions == [] and plain.query_attention == {}


def test_output_without_output_adaptformer_and_with_class_token():
    vector_tasks = [t for t in ALL_KIND_TASKS if t.kind.value not in ("segmentation", "detection")]
    model = small_model(vector_tasks, output_adaptformer=False, class_token=True, pos_embed="rope+learned",
                        pos_grid=(4, 4, 4))
    batch = Batch.from_images([image(2), image(3)], [Domain("2d"), Domain("3d")],
                              {"presence": [1, 0], "grade": [2, None]})
    out = model(batch)
    loss, per_task = model.compute_loss(out, batch)
    assert set(per_task) == {"presence", "grade"} and torch.isfinite(loss)
    assert OrdinalHead.grade(out.predictions["grade"]).shape == (2,)


# ---------------------------------------------------------------------------- bad input
def test_wrong_channel_count_names_shape(model):
    batch = Batch.from_images([torch.rand(2, 16, 16)], Domain("2d"))
    with pytest.raises(ValueError, match=r"image 0: shape \(2, 16, 16\) has 2 channels; this model takes 3"):
        model(batch)


def test_size_not_divisible_by_patch_names_size(model):
    batch = Batch.from_images([torch.rand(1, 18, 16)], Domain("2d"))
    with pytest.raises(ValueError, match=r"spatial size \(18, 16\) is not divisible by the 2D patch size 4"):
        model(batch)


def test_dimensionality_must_match_domain():
    with pytest.raises(ValueError, match="is 2D but its domain says 3d"):
        Batch.from_images([torch.rand(1, 16, 16)], Domain("3d"))


def test_unknown_task_name_in_labels(model, mixed_batch):
    bad = Batch(mixed_batch.groups, mixed_batch.group_samples, mixed_batch.domains, {"nonsense": [1] * 5})
    with pytest.raises(LabelError, match=r"unknown task\(s\) \['nonsense'\]"):
        model.compute_loss(model(bad), bad)


@pytest.mark.parametrize("task, label, message", [
    ("organ", torch.tensor([1, 2]), r"sample 0: expected one class index, got shape \(2,\)"),
    ("organ", 7, r"sample 0: class 7 is outside 0..3"),
    ("findings", torch.ones(4), r"sample 0: expected 3 values, got shape \(4,\)"),
    ("tissue", torch.zeros(8, 8, dtype=torch.long), r"mask shape \(8, 8\) differs from the image's \(16, 16\)"),
    ("tissue", torch.full((16, 16), 5), r"mask values must be in 0..2"),
    ("lesions", torch.ones(2, 6), r"expected boxes of shape \(M <= 3, 4\), got \(2, 6\)"),
])
def test_labels_of_wrong_shape_are_named(model, task, label, message):
    batch = Batch.from_images([image(2)], Domain("2d"), {task: [label]})
    with pytest.raises(LabelError, match=message):
        model.compute_loss(model(batch), batch)


def test_label_for_domain_the_task_does_not_cover():
    model = small_model([TaskSpec("cxr", "binary", 1, dimensionalities=("2d",))])
    batch = Batch.from_images([image(3)], Domain("3d"), {"cxr": [1]})
    with pytest.raises(LabelError, match="does not apply to domain"):
        model.compute_loss(model(batch), batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="x", kind="nope", num_outputs=1), "unknown kind 'nope'"),
    (dict(name="x", kind="multiclass", num_outputs=1), "needs num_outputs >= 2"),
    (dict(name="x", kind="binary", num_outputs=3), "num_outputs 1"),
    (dict(name="", kind="binary", num_outputs=1), "non-empty identifier"),
    (dict(name="x", kind="binary", num_outputs=1, dimensionalities=("4d",)), "dimensionalities"),
])
def test_task_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(**kwargs)


def test_builder_and_config_errors():
    assert list_models() == ["medformer_base", "medformer_small", "medformer_tiny"]
    sizes = {name: (create_model(name, depth=1).config.embed_dim, create_model(name, depth=1).config.num_heads)
             for name in list_models()}
    assert sizes == {"medformer_tiny": (192, 3), "medformer_small": (384, 6), "medformer_base": (768, 12)}
    with pytest.raises(ValueError, match="unknown model 'medformer_huge'"):
        create_model("medformer_huge")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['widht'\]"):
        create_model("medformer_tiny", widht=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MedformerConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="task names must be unique"):
        create_model("medformer_tiny", tasks=[TaskSpec("a", "binary", 1)] * 2, depth=1)
    with pytest.raises(ValueError, match=r"exceeds the learned position grid \(1, 2, 2\)"):
        small_model(pos_embed="learned", pos_grid=(1, 2, 2))(Batch.from_images([image(2)], Domain("2d")))


def test_spec_dict_round_trip(model):
    import json
    spec = json.loads(json.dumps(model.spec_dict()))
    rebuilt = type(model).from_spec_dict(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.tasks == model.tasks


def test_forward_of_chosen_tasks_only(mixed_batch):
    model = small_model()
    with torch.no_grad():
        full = model(mixed_batch)
        some = model(mixed_batch, tasks=["presence", "tissue"])
    assert set(some.predictions) == {"presence", "tissue"}
    torch.testing.assert_close(some.predictions["presence"], full.predictions["presence"])
    with pytest.raises(ValueError, match="unknown task"):
        model(mixed_batch, tasks=["nope"])


def test_only_grad_tasks_record_gradients_and_their_values_are_unchanged(mixed_batch):
    """What an explanation of one task runs: the other heads skip autograd, and every value stays the same."""
    model = small_model()
    full = model(mixed_batch, tasks=["presence", "tissue"])
    some = model(mixed_batch, tasks=["presence", "tissue"], grad_tasks=["presence"])
    assert some.predictions["presence"].requires_grad and full.predictions["tissue"][0][1].requires_grad
    assert not any(logits.requires_grad for _, logits in some.predictions["tissue"])
    torch.testing.assert_close(some.predictions["presence"], full.predictions["presence"])
    for (_, a), (_, b) in zip(some.predictions["tissue"], full.predictions["tissue"]):
        torch.testing.assert_close(a, b.detach())
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\] in grad_tasks"):
        model(mixed_batch, grad_tasks=["nope"])


def test_coral_predictions_are_monotone_whatever_the_parameters():
    model = small_model(tasks=[TaskSpec("grade", "ordinal", 6)])
    head = model.heads["grade"]
    with torch.no_grad():
        head.threshold_gaps.normal_(0, 5)
        head.first_threshold.fill_(3.0)
    probs = torch.sigmoid(head.thresholds)
    assert (probs[1:] < probs[:-1]).all()  # P(grade > k) falls with k
    batch = Batch.from_images([image(2, seed=i) for i in range(4)], Domain("2d", "xray", "chest"))
    with torch.no_grad():
        logits = model(batch).predictions["grade"]
    assert (logits[:, 1:] < logits[:, :-1]).all()


def test_detected_boxes_stay_inside_the_image():
    model = small_model(tasks=[TaskSpec("lesions", "detection", 3)])
    with torch.no_grad():  # centres a patch up-left of every token, sizes of the whole image: boxes reach outside
        for layer in model.heads["lesions"].box.values():
            d = layer[-1].out_features // 2
            layer[-1].weight.zero_()
            layer[-1].bias.copy_(torch.tensor([0.0] + [-8.0] * d + [8.0] * d))
    batch = Batch.from_images([image(2, 16), image(3, 8)], [Domain("2d"), Domain("3d")])
    with torch.no_grad():
        boxes = model(batch).predictions["lesions"]["boxes"]
    for b, size in zip(boxes, (16, 8)):
        assert b.min() >= 0 and b.max() <= size


def test_added_task_follows_the_models_dtype_and_heads_need_their_queries():
    model = small_model(tasks=[TaskSpec("presence", "binary", 1)]).double()
    model.add_task(TaskSpec("organ", "multiclass", 4))
    assert model.output_adaptformer.queries["organ"].dtype == torch.float64
    with pytest.raises(ValueError, match="needs one query per class"):
        TaskSpec("tissue", "segmentation", 4, num_queries=2)
    with pytest.raises(ValueError, match="output_adaptformer=True"):
        small_model(tasks=[TaskSpec("tissue", "segmentation", 3)], output_adaptformer=False)


def test_input_attention_is_returned_on_request_only(mixed_batch):
    model = small_model()
    with torch.no_grad():
        assert model(mixed_batch).input_attention is None
        assert model(mixed_batch, return_attention=True).input_attention is not None


def test_unit_coords_are_token_centres_as_fractions_of_the_image():
    layout = TokenLayout.build([(2, 4), (2, 2, 2)], [torch.tensor([0]), torch.tensor([1])], [(8, 16), (8, 8, 8)],
                               num_samples=2, num_prefix=1)
    unit = layout.unit_coords
    first = layout.first_positions.tolist()
    assert unit[first].abs().sum() == 0  # class tokens
    two_d = unit[first[0] + 1:first[0] + 9]
    assert torch.allclose(two_d[:4], torch.tensor([[0.5, 0.25, x] for x in (0.125, 0.375, 0.625, 0.875)]))
    three_d = unit[first[1] + 1:first[1] + 9]
    assert torch.allclose(three_d[-1], torch.tensor([0.75, 0.75, 0.75]))


def test_task_queries_read_where_tokens_are_not_only_what_they_hold():
    torch.manual_seed(0)
    reader = OutputAdaptformer(16, 2, [TaskSpec("boxes", "detection", 2)])
    layout = TokenLayout.build([(3, 3)], [torch.tensor([0])], [(12, 12)], num_samples=1)
    x = torch.randn(9, 16)
    moved = x[torch.randperm(9)]  # the same contents at other positions
    same = lambda a, b: torch.allclose(reader(a, layout)[0]["boxes"], reader(b, layout)[0]["boxes"], atol=1e-6)  # noqa: E731
    assert same(x, moved)  # at start (position values zero) attention is blind to positions
    with torch.no_grad():
        reader.position_values.weight.normal_()
    assert not same(x, moved)


def test_dense_detection_fits_the_boxes_of_an_image():
    torch.manual_seed(0)
    model = small_model(tasks=[TaskSpec("lesions", "detection", 3)]).train()
    target = torch.tensor([[2.0, 3.0, 7.0, 9.0], [9.0, 8.0, 15.0, 13.0]])  # (y0, x0, y1, x1): centres in patches (1,1), (3,2)
    batch = Batch.from_images([image(2, 16)], [Domain("2d")], {"lesions": [target]})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        model.compute_loss(model(batch), batch)[0].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(batch).predictions["lesions"]
    scores, boxes = pred["logits"][0].sigmoid(), pred["boxes"][0]
    found = boxes[scores > 0.5]
    assert len(found) == 2  # two boxes, the third candidate is rejected
    from medexplore.models.boxes import box_iou
    assert (box_iou(target, found).max(1).values > 0.7).all()


@pytest.mark.parametrize("loss, expected", [("l1", 1.25), ("mse", 2.125), ("huber", 0.8125)])
def test_regression_loss_variants_known_values(loss, expected):
    head = kind_entry("regression").build_head(TaskSpec("count", "regression", 1, loss=loss), HeadDims(8, 1, {2: 4, 3: 4}, 8, 1))
    prediction = torch.tensor([[0.5], [3.0]])  # errors 0.5 and 2.0
    assert head.loss(prediction, [torch.tensor([0.0]), torch.tensor([1.0])]).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="loss 'l2' not available"):
        TaskSpec("count", "regression", 1, loss="l2")


def test_label_smoothing_known_values_and_what_it_leaves_alone():
    dims = HeadDims(8, 1, {2: 4, 3: 4}, 8, 1)

    def head(kind, n):
        return kind_entry(kind).build_head(TaskSpec("t", kind, n), dims)

    # binary: target 1 becomes 0.95 at smoothing 0.1; at logit 0 the loss is log 2 whatever the target
    logit = torch.tensor([2.0])
    expected = -(0.95 * math.log(torch.sigmoid(logit).item()) + 0.05 * math.log(1 - torch.sigmoid(logit).item()))
    assert head("binary", 1).loss(logit, [1], smoothing=0.1).item() == pytest.approx(expected, rel=1e-6)
    assert head("binary", 1).loss(torch.zeros(1), [1], smoothing=0.3).item() == pytest.approx(math.log(2))
    # multiclass: torch's own label smoothing (uniform over the classes)
    logits = torch.tensor([[1.0, -1.0, 0.5]])
    assert head("multiclass", 3).loss(logits, [2], smoothing=0.2).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([2]), label_smoothing=0.2).item())
    # ordinal (CORAL, 3 grades -> 2 thresholds): grade 1 targets (1, 0) become (0.9, 0.1)
    ordinal = torch.tensor([[0.3, -0.4]])
    assert head("ordinal", 3).loss(ordinal, [1], smoothing=0.2).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(ordinal, torch.tensor([[0.9, 0.1]])).item())
    # regression values and 0 smoothing are left as they are
    values = torch.tensor([[0.5], [3.0]])
    targets = [torch.tensor([0.0]), torch.tensor([1.0])]
    assert head("regression", 1).loss(values, targets, smoothing=0.4).item() == head("regression", 1).loss(values, targets).item()
    assert head("binary", 1).loss(logit, [1], smoothing=0.0).item() == pytest.approx(-math.log(torch.sigmoid(logit).item()))
    # a whole model: heads without a smoothing argument (masks, boxes, a registered kind's) are called as before
    model = small_model()
    batch = Batch.from_images([image(2, 16), image(3, 16)], [Domain("2d"), Domain("3d")],
                              {k: [full_labels(2, 16)[k], full_labels(3, 16, seed=1)[k]] for k in full_labels(2, 16)})
    out = model(batch)
    smoothed, per_task = model.compute_loss(out, batch, smoothing=0.1)
    plain, plain_per_task = model.compute_loss(out, batch)
    assert torch.isfinite(smoothed) and per_task["tissue"] == plain_per_task["tissue"]
    assert per_task["presence"] != plain_per_task["presence"]
    from medexplore.train.config import TrainConfig
    with pytest.raises(ValueError, match=r"train.label_smoothing must be in \[0, 0.5\)"):
        TrainConfig(label_smoothing=0.5)


def test_conv_stem_gives_the_patch_grid_and_treats_grey_as_replicated_grey():
    from medexplore.models.tokenizer import ConvStem

    stem = ConvStem(3, 3, 32, 4).eval()
    grey = torch.rand(2, 1, 8, 12, 16)
    assert stem(grey).shape == (2, 32, 2, 3, 4)
    assert torch.allclose(stem(grey), stem(grey.expand(-1, 3, -1, -1, -1)), atol=1e-5)
    with pytest.raises(ValueError, match="stem 'conv' needs a patch size that is a power of 2, got 6"):
        small_model(stem="conv", patch_size=6)
    with pytest.raises(ValueError, match="stem must be one of"):
        small_model(stem="convolution")


def test_batch_norm_stem_and_layer_scale_are_built_and_checked():
    from timm.layers import LayerScale

    from medexplore.models.tokenizer import ConvStem

    stem = ConvStem(3, 3, 32, 4, norm="batch").eval()
    assert [type(m).__name__ for m in stem.convs if "Norm" in type(m).__name__] == ["BatchNorm3d"] * 2
    grey = torch.rand(2, 1, 8, 12, 16)
    assert torch.allclose(stem(grey), stem(grey.expand(-1, 3, -1, -1, -1)), atol=1e-5)
    model = small_model(stem="conv", stem_norm="batch", layer_scale=0.1)
    assert isinstance(model.patch_embed.stem_2d.convs[1], torch.nn.BatchNorm2d)
    assert isinstance(model.blocks[1].ls2, LayerScale) and torch.equal(model.blocks[1].ls2.gamma, torch.full((48,), 0.1))
    assert isinstance(small_model().blocks[0].ls1, torch.nn.Identity)  # the default stays timm's plain ViT
    instance = small_model(stem="conv", stem_norm="instance").patch_embed.stem_3d.convs[1]
    assert isinstance(instance, torch.nn.GroupNorm) and instance.num_groups == instance.num_channels
    with pytest.raises(ValueError, match=r"the image: spatial size \(4, 4, 4\) is one 3D patch; stem_norm 'instance'"):
        small_model(stem="conv", stem_norm="instance").patch_embed.grid((1, 4, 4, 4), where="the image")
    with pytest.raises(ValueError, match="MedformerConfig.stem_norm must be one of \\('group', 'instance', 'batch'\\), got 'layer'"):
        small_model(stem="conv", stem_norm="layer")
    with pytest.raises(ValueError, match="MedformerConfig.layer_scale must be > 0"):
        small_model(layer_scale=0.0)



def test_a_narrower_full_resolution_decoder_stage_keeps_the_coarse_levels_and_the_output():
    """``seg_full_channels`` narrows only the stem, the last fusion and the head: the coarse levels (and the
    task's class embedding) keep their shapes, so a checkpoint of the full-width model initialises them."""
    tasks = [TaskSpec("tissue", "segmentation", 3)]
    wide, narrow = small_model(tasks, seg_channels=8), small_model(tasks, seg_channels=8, seg_full_channels=4)
    assert {k: v.shape for k, v in small_model(tasks, seg_channels=8, seg_full_channels=8).state_dict().items()} == \
        {k: v.shape for k, v in wide.state_dict().items()}
    wide_shapes, narrow_shapes = wide.state_dict(), narrow.state_dict()
    changed = {k.split(".decoders.3d.")[-1] for k in wide_shapes
               if ".decoders.3d." in k and wide_shapes[k].shape != narrow_shapes[k].shape}
    assert changed == {"fuse.1.0.weight", "fuse.1.1.weight", "fuse.1.1.bias", "stem.0.weight", "stem.1.weight",
                       "stem.1.bias", "head.0.0.weight", "head.0.1.weight", "head.0.1.bias", "head.1.weight"}
    decoder = narrow.heads["tissue"].decoders["3d"]
    assert decoder.stem[0].out_channels == decoder.fuse[1][0].out_channels == decoder.head[1].in_channels == 4
    assert decoder.fuse[0][0].out_channels == 8 and decoder.head[1].out_channels == 8
    assert decoder.stem[1].num_groups == 2 and decoder.fuse[0][1].num_groups == 4  # groups of two channels at least
    batch = Batch.from_images([image(3)], [Domain("3d", "mri", "brain")])
    assert narrow(batch).predictions["tissue"][0][1].shape == wide(batch).predictions["tissue"][0][1].shape == (1, 3, 16, 16, 16)
    assert narrow.num_params() < wide.num_params()
    with pytest.raises(ValueError, match="seg_full_channels must be >= 1"):
        small_model(tasks, seg_full_channels=0)

def test_a_training_step_runs_only_the_heads_of_labelled_tasks(mixed_batch):
    from medexplore.train.config import TrainConfig
    from medexplore.train.objectives import SupervisedObjective

    model = small_model().train()
    only_organ = {name: (labels if name == "organ" else [None] * len(labels))
                  for name, labels in mixed_batch.targets.items()}
    batch = Batch(mixed_batch.groups, mixed_batch.group_samples, mixed_batch.domains, only_organ, mixed_batch.meta)
    ran = []
    for name, head in model.heads.items():
        head.register_forward_hook(lambda module, args, out, name=name: ran.append(name))
    objective = SupervisedObjective(model, TrainConfig(augment=False, device="cpu"))
    total, per_task = objective.loss(model, batch, step=0, device=torch.device("cpu"))
    assert ran == ["organ"] and list(per_task) == ["organ"]
    total.backward()
    assert next(model.heads["organ"].parameters()).grad is not None
    # the loss is the one a full forward gives: skipping heads changes nothing that is learned
    full_total, _ = model.compute_loss(model(batch), batch)
    assert torch.allclose(total, full_total)
