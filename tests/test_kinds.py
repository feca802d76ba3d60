"""The table of task kinds: every built-in kind is one entry, and a new kind is one register_kind call
that training, evaluation, embedding tables and figures pick up without other edits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

from medexplore.analysis.embeddings import compute_embeddings
from medexplore.data.sample import Sample
from medexplore.models import KINDS, Domain, KindEntry, TaskSpec, kind_entry, register_kind
from medexplore.models.heads import TaskHead
from medexplore.models.kinds import headline_metric, monitor_metrics, score_task
from medexplore.train import TrainConfig, Trainer, evaluate
from medexplore.viz.figures import read_metrics, training_curves


def test_every_builtin_kind_has_an_entry_with_its_headline():
    assert set(KINDS) == {"binary", "multiclass", "multilabel", "ordinal", "regression", "segmentation", "detection"}
    assert {k: kind_entry(k).headline for k in KINDS} == {
        "binary": "auc", "multiclass": "auc", "multilabel": "auc", "ordinal": "auc", "regression": "mae",
        "segmentation": "dice", "detection": "map@0.5"}
    assert headline_metric({"mae": 0.5}) == ("mae", 0.5) and headline_metric({"dice": 0.7, "n": 3}) == ("dice", 0.7)
    assert "headline" in monitor_metrics() and "mae" not in monitor_metrics()  # monitors are higher-is-better
    with pytest.raises(ValueError, match="unknown task kind 'heatmap'"):
        kind_entry("heatmap")
    with pytest.raises(ValueError, match="already registered"):
        register_kind(KINDS["binary"])


class FractionHead(TaskHead):
    """Toy kind: a fraction in [0, 1] read from the mean task query, trained with squared error."""

    def __init__(self, spec, dim):
        super().__init__(spec)
        self.fc = torch.nn.Linear(dim, 1)

    def forward(self, queries, ctx):
        return self.fc(queries.mean(1))[:, 0].sigmoid()

    def loss(self, prediction, labels):
        idx, ys = self.present(labels)
        if not idx:
            return None
        return F.mse_loss(prediction[idx], torch.stack(ys).float().reshape(-1).to(prediction.device))


def _r2(spec, labels, preds):
    y, p = torch.stack(labels).float().reshape(-1).numpy(), torch.stack(preds).reshape(-1).numpy()
    return {"r2": float(1 - ((y - p) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))}


@pytest.fixture
def fraction_kind():
    entry = register_kind(KindEntry(
        "fraction", lambda spec, dims: FractionHead(spec, dims.dim), "vector", ("r2",), "r2",
        per_sample=lambda prediction, n: list(prediction.detach().float().cpu()[:, None]), score=_r2,
        label_cell=float, prediction_cell=float, agreement=lambda label, pred: ("error", abs(pred - label)),
        explain_outputs=lambda prediction: prediction[:, None], default_target=lambda outputs: 0,
        hard_label=lambda spec, item, logits: (float(item), 1.0), scores=lambda prediction: prediction[:, None]))
    yield entry
    del KINDS["fraction"]


def test_a_new_kind_registered_in_one_place_trains_evaluates_and_shows(fraction_kind, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 16, 16, generator=g) for _ in range(24)]
    data = [Sample(im, Domain("2d"), {"bright": float(im.mean() > 0.5) * 0.6 + 0.2}) for im in images]
    model = small_model(tasks=[TaskSpec("bright", "fraction", 1)])
    config = TrainConfig(epochs=3, batch_size=8, lr=3e-3, device="cpu", monitor="r2", augment=False)
    result = Trainer(model, data, config, tmp_path / "run", val_data=data).fit()
    assert result.best is not None and np.isfinite(result.best)  # validation scored it, best chosen by it
    metrics = evaluate(model, data)
    assert set(metrics["bright"]) == {"r2", "n"} and metrics["bright"]["n"] == 24
    assert score_task(model.tasks["bright"], [(torch.tensor(0.5), torch.tensor([0.5]))] * 2)["n"] == 2
    table = compute_embeddings(model, data).metadata
    assert {"label:bright", "pred:bright", "error:bright"} <= set(table.columns)
    assert table["pred:bright"].between(0, 1).all()
    figure = training_curves(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert any("bright (r2)" in t.get_text() for ax in figure.axes for t in ax.get_legend().get_texts())
