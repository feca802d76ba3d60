"""Class-balanced sampling with logit adjustment: known offsets, sampler weights, and calibrated probabilities."""
import math

import pytest
import torch

from medexplore.data import MixedDataset, Sample, collate
from medexplore.models import Domain, TaskSpec, create_model
from medexplore.models.kinds import kind_entry
from medexplore.train import TrainConfig, Trainer
from medexplore.train.builders import sampling_weights
from medexplore.train.priors import class_shares, prior_offsets

BINARY = TaskSpec("finding", "binary", 1)


def rare_positives(n=40, positives=4):
    """Blank images (nothing to learn but the prior), the first ``positives`` labelled 1."""
    return [Sample(torch.zeros(1, 8, 8), Domain("2d"), {"finding": int(i < positives)}) for i in range(n)]


def test_offsets_of_each_class_kind_are_the_sampled_minus_the_data_logits():
    data, sampled = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    assert float(kind_entry("binary").prior_offset(data, sampled)) == pytest.approx(math.log(9))
    shares = torch.tensor([0.5, 0.3, 0.2]), torch.full((3,), 1 / 3)
    multiclass = kind_entry("multiclass").prior_offset(*shares)
    assert torch.allclose(multiclass, torch.log(torch.tensor([2 / 3, 10 / 9, 5 / 3])))
    # no exact offset, so never class-balanced: re-weighting grades moves each CORAL threshold differently
    assert all(kind_entry(kind).prior_offset is None for kind in ("ordinal", "regression", "segmentation"))


def test_label_balance_gives_the_rare_class_half_the_draws_and_its_offset():
    data = rare_positives()
    weights = sampling_weights(data, "label", {"finding": BINARY})
    assert float(weights[:4].sum()) == pytest.approx(0.5)
    shares = class_shares({"finding": BINARY}, data, weights)["finding"]
    assert shares[0].tolist() == pytest.approx([0.9, 0.1]) and shares[1].tolist() == pytest.approx([0.5, 0.5])
    assert float(prior_offsets({"finding": BINARY}, data, weights)["finding"]) == pytest.approx(math.log(9))
    assert prior_offsets({"finding": BINARY}, data, None) == {}
    assert prior_offsets({"finding": BINARY}, data, torch.full((40,), 1 / 40)) == {}  # shares unchanged: no offset


def test_source_label_balance_makes_sources_and_their_classes_equally_likely():
    mixed = MixedDataset({"a": rare_positives(40, 4), "b": rare_positives(10, 5)})
    w = sampling_weights(mixed, "source_label", {"finding": BINARY})
    sources = torch.tensor([mixed.source_of(i) == "a" for i in range(len(mixed))])
    positive = torch.tensor([mixed.labels_of(i)["finding"] == 1 for i in range(len(mixed))])
    for source in (sources, ~sources):
        assert float(w[source].sum()) == pytest.approx(0.5)
        assert float(w[source & positive].sum()) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="train.balance=source_label needs a MixedDataset"):
        sampling_weights(rare_positives(), "source_label", {"finding": BINARY})


def test_balance_power_tempers_the_class_shares_and_leaves_the_sources_equal():
    data = rare_positives()  # 36 negatives, 4 positives
    tasks = {"finding": BINARY}
    half = sampling_weights(data, "label", tasks, power=0.5)
    assert float(half[:4].sum()) == pytest.approx(2 / (2 + 6))  # square-root shares: sqrt 4 : sqrt 36
    assert torch.equal(sampling_weights(data, "label", tasks, power=1.0), sampling_weights(data, "label", tasks))
    assert sampling_weights(data, "label", tasks, power=0.0).tolist() == pytest.approx([1 / 40] * 40)
    mixed = MixedDataset({"a": rare_positives(40, 4), "b": rare_positives(10, 5)})
    sources = torch.tensor([mixed.source_of(i) == "a" for i in range(len(mixed))])
    tempered = sampling_weights(mixed, "source_label", tasks, power=0.5)
    assert float(tempered[sources].sum()) == pytest.approx(0.5)  # the sources stay equally likely
    assert float(tempered[sources][:4].sum()) == pytest.approx(0.5 * 2 / 8)
    assert float(tempered[~sources][:5].sum()) == pytest.approx(0.25)  # a source already balanced stays so
    assert torch.allclose(sampling_weights(mixed, "source_label", tasks, power=0.0), sampling_weights(mixed, "source", tasks))
    shares = class_shares(tasks, data, half)["finding"]  # the correction follows the tempered shares
    assert float(prior_offsets(tasks, data, half)["finding"]) == pytest.approx(math.log(0.25 / 0.75) - math.log(0.1 / 0.9))
    assert shares[1].tolist() == pytest.approx([0.75, 0.25])
    for power in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"train.balance_power must be in \[0, 1\], got"):
            sampling_weights(data, "label", tasks, power=power)
        with pytest.raises(ValueError, match=r"train.balance_power must be in \[0, 1\], got"):
            TrainConfig(balance="label", balance_power=power)


def test_ordinal_grades_are_not_class_balanced():
    graded = [Sample(torch.zeros(1, 8, 8), Domain("2d"), {"grade": int(i < 2)}) for i in range(10)]
    mixed = MixedDataset({"a": rare_positives(40, 4), "b": graded})
    tasks = {"finding": BINARY, "grade": TaskSpec("grade", "ordinal", 2)}
    w = sampling_weights(mixed, "source_label", tasks)
    in_b = torch.tensor([mixed.source_of(i) == "b" for i in range(len(mixed))])
    assert w[in_b].tolist() == pytest.approx([0.05] * 10)  # half the draws, spread as in the data
    assert float(w[~in_b][:4].sum()) == pytest.approx(0.25)  # the binary source is still class-balanced
    with pytest.raises(ValueError, match=r"train.balance=label: no task .* kinds are ordinal\."):
        sampling_weights(graded, "label", {"grade": TaskSpec("grade", "ordinal", 2)})


@pytest.mark.parametrize("correction, expected", [(True, 0.1), (False, 0.5)])
def test_balanced_training_keeps_the_data_prior_only_with_the_correction(tmp_path, correction, expected):
    data = rare_positives()
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[BINARY], embed_dim=16, depth=1, num_heads=2, patch_size=4)
    config = TrainConfig(epochs=4, steps_per_epoch=25, batch_size=8, lr=1e-2, device="cpu", balance="label",
                         prior_correction=correction, augment=False, monitor="acc")
    Trainer(model, data, config, tmp_path).fit()
    model.eval()
    with torch.no_grad():
        p = model(collate(data[:8])).predictions["finding"].sigmoid()
    assert float(p.mean()) == pytest.approx(expected, abs=0.05)
