"""Figures (every axis labelled, colour-blind-safe defaults) and the notebook embedding explorer."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from medexplore import analysis as A  # noqa: E402
from medexplore import viz  # noqa: E402
from medexplore.analysis.embeddings import EmbeddingSet  # noqa: E402


def _labelled(fig):
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>" or not ax.has_data():
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axis in {ax.get_title()!r}"


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"modality": rng.choice(["ct", "mri", "xray"], 90), "dimensionality": ["2d"] * 90,
                         "score": rng.random(90), "label:lesion": rng.choice([0.0, 1.0, np.nan], 90)})
    return rng.normal(size=(90, 12)), meta


def test_scatter_categorical_continuous_and_missing(table):
    x, meta = table
    coords = A.pca(x).coords
    fig = viz.scatter(coords, meta, "modality", highlight=[0, 1])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"ct", "mri", "xray", "selected"} <= set(legend)
    colors = {c.lower() for c in viz.category_colors(["ct", "mri", "xray"]).values()}
    assert colors <= {c.lower() for c in viz.OKABE_ITO}
    assert len(viz.scatter(coords, meta, "score").axes) == 2  # a colour bar for values
    assert "(none)" in [t.get_text() for t in viz.scatter(coords, meta, "label:lesion").axes[0].get_legend().get_texts()]
    _labelled(fig)
    with pytest.raises(KeyError, match="nope"):
        viz.scatter(coords, meta, "nope")


def test_analysis_figures_are_labelled(table):
    x, meta = table
    result = A.analyze_subspaces(x, meta, k=3, targets=["modality"])
    gates = A.MixingWeights(np.random.default_rng(0).dirichlet([1, 1], 90), ["general", "medical"],
                            ["expert", "expert"], meta)
    figures = [viz.principal_angle_heatmap(result.angles), viz.variance_bars(result.variance),
               viz.decodability_bars(result.decodability), viz.eigenvalue_spectra({"a": np.logspace(0, -3, 10)}),
               viz.fisher_curves({"run": pd.DataFrame({"step": [1, 2], "dominant_ratio": [0.5, 0.4],
                                                       "spectral_entropy": [1.0, 1.2]})}),
               viz.mixing_bars(A.summarize_mixing(gates, "modality", per="component")),
               viz.mixing_histograms(pd.DataFrame(gates.weights, columns=gates.names), by=meta["modality"]),
               viz.overlay_2d(np.random.rand(1, 16, 16), np.random.randn(16, 16), mask=np.eye(16)),
               viz.orthoslice_overlay(np.random.rand(1, 8, 8, 8), np.random.rand(8, 8, 8), mask=np.ones((8, 8, 8))),
               viz.explanation_panel(np.random.rand(1, 8, 8, 8), {"ig": np.random.randn(8, 8, 8)})]
    for fig in figures:
        _labelled(fig)
        fig.canvas.draw()


def test_orthoslices_cut_through_the_maximum():
    overlay = np.zeros((6, 8, 10))
    overlay[2, 5, 7] = 1
    fig = viz.orthoslice_overlay(np.random.rand(1, 6, 8, 10), overlay)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["axial (z = 2)", "coronal (y = 5)", "sagittal (x = 7)"]


def test_selection_helpers():
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.5, 0.2]])
    np.testing.assert_array_equal(A.points_in_polygon(coords, [(-1, -1), (2, -1), (2, 2), (-1, 2)]), [0, 1, 3])
    np.testing.assert_array_equal(A.points_in_box(coords, (0.4, 0.1), (1.5, 1.5)), [1, 3])
    assert A.nearest_point(coords, (4.8, 5.1)) == 2 and A.nearest_point(coords, (3, 3), max_distance=0.5) is None
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.3]])
    np.testing.assert_array_equal(A.nearest_neighbours(features, 0, 2), [1, 3])
    with pytest.raises(ValueError, match="3"):
        A.points_in_polygon(coords, [(0, 0), (1, 1)])


def test_embedding_explorer_actions(table, tmp_path):
    from medexplore.viz.jupyter import EmbeddingExplorer

    x, meta = table
    emb = EmbeddingSet(x.astype(np.float32), meta, {"lesion": x[:, :4].astype(np.float32)})
    images = [torch.rand(1, 8, 8) if i % 2 else torch.rand(1, 4, 8, 8) for i in range(len(x))]
    explorer = EmbeddingExplorer(emb, images, color_by="modality", cache=tmp_path)
    picked = explorer.pick(5)
    assert picked[0] == 5 and list(picked[1:]) == list(A.nearest_neighbours(x, 5, 7))
    assert explorer.shown.value.startswith("<b>sample 5 and its 7 nearest neighbours</b>: #5 ")
    assert explorer.shown.value.count("#") == 8
    lo, hi = explorer.coords.min(0), explorer.coords.mean(0)
    chosen = explorer.lasso([(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])])
    inside = (explorer.coords >= lo).all(1) & (explorer.coords <= hi).all(1)
    assert set(chosen) == set(np.flatnonzero(inside))
    explorer.features.value = "task:lesion"  # re-projects the per-task features
    assert explorer.coords.shape == (90, 2)
    explorer.color.value = "score"
    explorer.index.value = 7  # typing an index picks it
    assert explorer.selected[0] == 7
    with pytest.raises(KeyError, match="nope"):
        EmbeddingExplorer(emb, images, color_by="nope")
