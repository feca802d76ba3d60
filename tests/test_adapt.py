"""Adaptation strategies and the GMoE-Adapter: what learns, what stays equal, what reloads."""
import copy

import pytest
import torch

from medexplore.adapt import STRATEGIES, AdaptConfig, GatedExperts, LoRALinear, apply_strategy, merge_lora
from medexplore.analysis import gate_weights, summarize_mixing
from medexplore.data.sample import Sample
from medexplore.experiments.protocol import patient_split
from medexplore.models import Batch, Domain, TaskSpec, create_model
from medexplore.train.checkpoint import load_model, save_checkpoint
from medexplore.train.weights import WeightsError, load_backbone_weights

TASKS = [TaskSpec("grade", "multiclass", 3), TaskSpec("mask", "segmentation", 2)]
SIZE = dict(depth=3, patch_size=4, embed_dim=48, num_heads=2)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return create_model("medformer_tiny", tasks=TASKS, **{**SIZE, **over})


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 16, 16, generator=g), torch.rand(1, 8, 8, 8, generator=g), torch.rand(3, 12, 12, generator=g),
              torch.rand(1, 16, 16, generator=g)]
    domains = [Domain("2d", "xray", "chest"), Domain("3d", "mri", "brain"), Domain("2d", "fundus", "eye"),
               Domain("2d", "xray", "chest")]
    masks = [torch.randint(0, 2, img.shape[1:], generator=g) for img in images]
    return Batch.from_images(images, domains, {"grade": [0, 2, 1, None], "mask": masks})


def _adapted(strategy, seed=0, **options):
    model = _model(seed)
    experts = [_model(seed + 1)] if strategy == "gmoe" else []
    apply_strategy(model, AdaptConfig(strategy=strategy, **options), experts)
    return model


EXPECTED = {  # strategy -> what may learn beyond the task side (Output Adaptformer, heads)
    "full": lambda n: True,
    "linear": lambda n: False,
    "partial": lambda n: n.startswith(("blocks.1.", "blocks.2.", "norm.")),
    "adapter": lambda n: any(k in n for k in (".mlp.down.", ".mlp.up.", ".mlp.scale")),
    "vpt_shallow": lambda n: n.startswith("prompts."),
    "vpt_deep": lambda n: n.startswith("prompts."),
    "lora": lambda n: ".lora_" in n,
    "gmoe": lambda n: any(k in n for k in (".mlp.down.", ".mlp.up.", ".mlp.scale", ".gate.", "patch_embed.logits")),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_intended_parameters_get_gradients(strategy):
    model = _adapted(strategy, blocks=2)
    batch = _batch()
    for p in model.parameters():  # make zero-initialised branches pass gradients everywhere
        if p.requires_grad and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    loss, _ = model.compute_loss(model(batch), batch)
    loss.backward()
    for name, p in model.named_parameters():
        intended = name.startswith(("output_adaptformer.", "heads.")) or EXPECTED[strategy](name)
        assert p.requires_grad == intended, name
        if not intended:
            assert p.grad is None, name
    learning = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("output_adaptformer.", "heads."))]
    got_grad = [n for n in learning if model.get_parameter(n).grad is not None and model.get_parameter(n).grad.abs().sum() > 0]
    assert got_grad == learning  # every added/unfrozen backbone parameter really learns


@pytest.mark.parametrize("strategy", ["adapter", "lora"])
def test_zero_initialised_branches_leave_outputs_unchanged(strategy):
    base, batch = _model().eval(), _batch()
    adapted = copy.deepcopy(base)
    apply_strategy(adapted, strategy)
    adapted.eval()
    assert torch.allclose(base(batch).predictions["grade"], adapted(batch).predictions["grade"], atol=1e-6)


def test_gmoe_of_identical_experts_equals_the_base_model():
    base, batch = _model().eval(), _batch()
    gmoe = copy.deepcopy(base)
    apply_strategy(gmoe, "gmoe", [copy.deepcopy(base)])
    gmoe.eval()
    a, b = base(batch), gmoe(batch)
    assert torch.allclose(a.predictions["grade"], b.predictions["grade"], atol=1e-5)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)


def test_merged_lora_equals_unmerged():
    model, batch = _adapted("lora", rank=3, alpha=6.0).eval(), _batch()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b, std=0.05)
    before = model(batch).predictions["grade"]
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(before, model(batch).predictions["grade"], atol=1e-5)


def test_deep_vpt_with_zero_prompts_equals_the_base_model():
    base, batch = _model().eval(), _batch()
    vpt = copy.deepcopy(base)
    apply_strategy(vpt, AdaptConfig(strategy="vpt_deep", prompts=0))
    vpt.eval()
    assert torch.equal(base(batch).predictions["grade"], vpt(batch).predictions["grade"])


@pytest.mark.parametrize("strategy", ["vpt_shallow", "vpt_deep"])
@pytest.mark.parametrize("packing", ["grouped", "padded"])
def test_prompts_stay_within_their_sample_in_a_packed_batch(strategy, packing):
    model, batch = _adapted(strategy, prompts=5).eval(), _batch()
    packed = model(batch, packing=packing).predictions["grade"]
    for i, image in enumerate([img for group in batch.groups for img in group]):
        s = int(torch.cat(batch.group_samples)[i])
        alone = model(Batch.from_images([image], [batch.domains[s]])).predictions["grade"]
        assert torch.allclose(packed[s], alone[0], atol=1e-5), (strategy, packing, s)
    # and the prompts do change what the model computes
    base = _model().eval()
    assert not torch.allclose(base(batch).predictions["grade"], packed, atol=1e-4)


@pytest.mark.parametrize("per_token", [False, True])
def test_gate_weights_are_a_distribution_per_sample(per_token):
    model, batch = _adapted("gmoe", gate_per_token=per_token), _batch()
    for module in model.modules():
        if isinstance(module, GatedExperts):
            torch.nn.init.normal_(module.gate.weight, std=0.5)
    out = model(batch)
    assert len(out.gates) == SIZE["depth"]
    for weights in out.gates.values():
        assert weights.shape == (batch.num_samples, 2)
        assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(batch.num_samples))
        assert weights.std(0).max() > 1e-3  # input-dependent


def test_gate_weights_recorded_per_sample_for_analysis():
    model = _adapted("gmoe")
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.rand(1, 16, 16, generator=g), Domain("2d", m, "chest"), {}) for m in ("xray", "ct") * 3]
    mixing = gate_weights(model, samples)
    assert mixing.weights.shape == (6, 2 * SIZE["depth"]) and set(mixing.groups) == {"medical", "general"}
    assert torch.allclose(torch.tensor(mixing.by_group().sum(axis=1).values), torch.ones(6, dtype=torch.float64))
    summary = summarize_mixing(mixing, by="modality")
    assert list(summary.index) == ["ct", "xray"] and ("mean", "medical") in summary.columns


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_modules_stay_in_eval_mode(strategy):
    model = _adapted(strategy, blocks=1)
    model.train()
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            assert not module.training, name
    assert model.heads.training


@pytest.mark.parametrize("strategy", STRATEGIES + ("lora_merged",))
def test_adapted_checkpoint_reloads_to_the_same_outputs(strategy, tmp_path):
    model = _adapted("lora" if strategy == "lora_merged" else strategy, prompts=3)
    for p in model.parameters():  # trained-looking values in every branch
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.01)
    if strategy == "lora_merged":
        merge_lora(model)
    model.eval()
    batch = _batch()
    save_checkpoint(tmp_path / "ckpt", model, {})
    loaded, _ = load_model(tmp_path / "ckpt")
    loaded.eval()
    assert loaded.adaptation == model.adaptation
    a, b = model(batch), loaded(batch)
    assert torch.equal(a.predictions["grade"], b.predictions["grade"])
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]


def test_gate_reads_layer_normalised_tokens_and_older_checkpoints_keep_raw_ones(tmp_path):
    """The gate's logits do not depend on the tokens' scale (raw tokens of a trained body are small, so a
    zero-initialised gate read them too slowly); checkpoints written before keep reading raw tokens."""
    model = _adapted("gmoe")
    gate = next(m for m in model.modules() if isinstance(m, GatedExperts))
    torch.nn.init.normal_(gate.gate.weight, std=0.5)
    tokens = torch.randn(5, SIZE["embed_dim"], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gate._logits(tokens * 10), gate._logits(tokens), rtol=1e-4, atol=1e-4)  # LayerNorm eps
    raw = GatedExperts(list(gate.experts), SIZE["embed_dim"], normalize=False)
    raw.gate.load_state_dict(gate.gate.state_dict())
    torch.testing.assert_close(raw._logits(tokens), gate.gate(tokens))
    assert model.adaptation["gate_norm"] is True
    save_checkpoint(tmp_path / "new", model, {})
    assert all(m.normalize for m in load_model(tmp_path / "new")[0].modules() if isinstance(m, GatedExperts))
    model.adaptation = {k: v for k, v in model.adaptation.items() if k != "gate_norm"}  # as written before
    save_checkpoint(tmp_path / "old", model, {})
    old, _ = load_model(tmp_path / "old")
    assert not any(m.normalize for m in old.modules() if isinstance(m, GatedExperts)) and old.adaptation["gate_norm"] is False


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="adapt.strategy must be one of"):
        AdaptConfig(strategy="bitfit")
    with pytest.raises(ValueError, match="adapt.rank must be >= 1"):
        AdaptConfig(strategy="lora", rank=0)
    with pytest.raises(ValueError, match="adapt.blocks 7 exceeds the model's depth 3"):
        _adapted("partial", blocks=7)
    with pytest.raises(ValueError, match="already adapted"):
        apply_strategy(_adapted("lora"), "adapter")
    with pytest.raises(ValueError, match="embed_dim: 48 vs 64"):
        apply_strategy(_model(), "gmoe", [create_model("medformer_tiny", **{**SIZE, "embed_dim": 64})])


def test_timm_weights_from_file_name_or_a_clear_offline_message(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                            embed_dim=48, depth=3, num_heads=2)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = _model(class_token=True, pos_embed="learned", pos_grid=(1, 4, 4), input_adaptformer=False)
    assert "timm weights file" in load_backbone_weights(model, tmp_path / "vit.safetensors")
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model.pos.pos_embed.shape[1] == 1 + 16  # resampled from the 8x8 grid
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="broken.pth: unreadable weights"):
        load_backbone_weights(model, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing.safetensors: no such weights file"):
        load_backbone_weights(model, tmp_path / "missing.safetensors")
    monkeypatch.setattr("medexplore.train.weights._online", lambda host="huggingface.co": False)
    with pytest.raises(WeightsError, match="no network.*--weights PATH"):
        load_backbone_weights(model, "vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(WeightsError, match="neither a file nor a timm model name"):
        load_backbone_weights(model, "no_such_vit")


def test_patient_split_holds_out_whole_patients():
    def samples(patients):
        return [Sample(torch.zeros(1, 4, 4), Domain("2d"), {}, patient_id=p) for p in patients]

    splits = {"train": samples("aabbccdd"), "test": samples("abcdd")}
    seen, unseen, held = patient_split(splits, holdout=0.25, seed=3)
    assert len(held) == 1
    for split, data in splits.items():
        seen_ids = {data[i].patient_id for i in seen[split].indices}
        unseen_ids = {data[i].patient_id for i in unseen[split].indices}
        assert unseen_ids == set(held) and not seen_ids & unseen_ids
        assert len(seen[split]) + len(unseen[split]) == len(data)
    assert patient_split(splits, held_out=["c"])[2] == ["c"]
    with pytest.raises(ValueError, match="no patient id"):
        patient_split({"train": [Sample(torch.zeros(1, 4, 4), Domain("2d"), {})] * 3})
