"""Figures for the analysis results: scatter plots, subspace heatmaps, spectra, gates, overlays.

Readable defaults: colour-blind-safe colours (Okabe-Ito for categories, viridis/cividis for values,
a diverging map for signed attributions), every axis labelled. Each function returns a matplotlib
``Figure`` (or draws on a given ``ax``) and never calls ``pyplot.show``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import UserError
from .figures import display_image

__all__ = ["OKABE_ITO", "category_colors", "scatter", "principal_angle_heatmap", "variance_bars",
           "decodability_bars", "eigenvalue_spectra", "fisher_curves", "mixing_bars", "mixing_histograms",
           "overlay_2d", "orthoslice_overlay", "explanation_panel"]

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
             "#999999")


def category_colors(values: Sequence) -> dict:
    """A colour per distinct value (Okabe-Ito, then matplotlib's tab20 when there are more than 9)."""
    import matplotlib

    names = list(dict.fromkeys(str(v) for v in values))
    palette = list(OKABE_ITO) if len(names) <= len(OKABE_ITO) else \
        [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _is_categorical(values: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values) or values.nunique() <= 10


def _new_ax(ax, size=(5, 4)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def scatter(coords: np.ndarray, metadata: pd.DataFrame | None = None, color_by: str | None = None, ax=None,
            title: str = "", axis_labels: tuple[str, str] = ("component 1", "component 2"), size: float | None = None,
            highlight: Sequence[int] = (), legend_loc: str = "best") -> Figure:
    """2D scatter coloured by a metadata column (legend for categories, colour bar for values).

    ``legend_loc="best"`` searches for the emptiest corner, which is slow with many points
    (docs/measurements.md); interactive views pass a fixed location.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise UserError(f"coords must be (N, >=2), got shape {coords.shape}")
    fig, ax = _new_ax(ax)
    size = size if size is not None else float(np.clip(3000 / max(len(coords), 1), 2, 30))
    if color_by is None or metadata is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, color=OKABE_ITO[4], linewidths=0)
    else:
        if color_by not in metadata.columns:
            raise KeyError(f"no column {color_by!r} to colour by; columns: {list(metadata.columns)}")
        values = metadata[color_by].reset_index(drop=True)
        missing = values.isna().to_numpy()
        if missing.any():
            ax.scatter(coords[missing, 0], coords[missing, 1], s=size, color="#DDDDDD", linewidths=0, label="(none)")
        if _is_categorical(values[~missing]):
            colors = category_colors(values[~missing])
            text = values.astype(str).to_numpy()
            for name, color in colors.items():
                sel = (text == name) & ~missing
                ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=color, linewidths=0, label=name)
        else:
            points = ax.scatter(coords[~missing, 0], coords[~missing, 1], s=size, linewidths=0,
                                c=values[~missing].astype(float), cmap="viridis")
            fig.colorbar(points, ax=ax, label=color_by)
    if len(highlight):
        idx = np.asarray(highlight, dtype=int)
        ax.scatter(coords[idx, 0], coords[idx, 1], s=size * 6 + 20, facecolors="none", edgecolors="black",
                   linewidths=1.2, label="selected")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=color_by, fontsize=7, title_fontsize=8, markerscale=max(1.0, 12 / size) ** 0.5,
                  loc=legend_loc, frameon=False)
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], title=title)
    return fig


def principal_angle_heatmap(angles: pd.DataFrame, ax=None, title: str = "mean principal angle between subspaces"
                            ) -> Figure:
    """Groups x groups heatmap of principal angles (degrees; 0 = same subspace, 90 = orthogonal)."""
    fig, ax = _new_ax(ax, (5, 4.2))
    image = ax.imshow(angles.to_numpy(), cmap="cividis", vmin=0, vmax=90)
    ax.set_xticks(range(len(angles.columns)), angles.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(angles.index)), angles.index)
    for (i, j), value in np.ndenumerate(angles.to_numpy()):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color="white" if value < 50 else "black")
    fig.colorbar(image, ax=ax, label="angle (degrees)")
    ax.set(title=title, xlabel="subspace", ylabel="subspace")
    return fig


def variance_bars(variance: pd.DataFrame, group: str = "modality", ax=None) -> Figure:
    """Stacked bars: each group's variance in the shared subspace, its specific complement, and neither."""
    fig, ax = _new_ax(ax, (6, 3.5))
    x = np.arange(len(variance))
    bottom = np.zeros(len(variance))
    for part, color in (("shared", OKABE_ITO[4]), ("specific", OKABE_ITO[0]), ("residual", "#BBBBBB")):
        ax.bar(x, variance[part], bottom=bottom, color=color, label=part)
        bottom += variance[part].to_numpy()
    ax.set_xticks(x, variance[group].astype(str), rotation=30, ha="right")
    ax.set(ylabel="fraction of variance", xlabel=group, ylim=(0, 1.05), title="variance by subspace")
    ax.legend(fontsize=8, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return fig


def decodability_bars(decodability: pd.DataFrame, ax=None) -> Figure:
    """Cross-validated balanced accuracy per target, from the shared / specific / all features."""
    fig, ax = _new_ax(ax, (7, 3.5))
    table = decodability.pivot(index="target", columns="features", values="balanced_accuracy")
    spread = decodability.pivot(index="target", columns="features", values="std")
    chance = decodability.groupby("target")["chance"].first().reindex(table.index)
    views = [v for v in ("shared", "specific", "all") if v in table.columns]
    width = 0.8 / len(views)
    x = np.arange(len(table))
    for k, (view, color) in enumerate(zip(views, (OKABE_ITO[4], OKABE_ITO[0], "#777777"))):
        ax.bar(x + (k - (len(views) - 1) / 2) * width, table[view], width, yerr=spread[view], color=color,
               label=view, capsize=2)
    ax.scatter(x, chance, marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(x, [t.replace("label:", "") for t in table.index], rotation=30, ha="right")
    ax.set(ylabel="balanced accuracy (CV)", xlabel="decoded target", ylim=(0, 1.05),
           title="what each subspace encodes")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def eigenvalue_spectra(spectra: Mapping[str, np.ndarray], ax=None, top: int = 50) -> Figure:
    """Eigenvalues (log scale) against their rank, one line per spectrum."""
    fig, ax = _new_ax(ax, (5, 3.5))
    for (name, values), color in zip(spectra.items(), OKABE_ITO):
        values = np.asarray(values)[:top]
        ax.semilogy(np.arange(1, len(values) + 1), np.clip(values, 1e-12, None), marker="o", ms=3, color=color,
                    label=name)
    ax.set(xlabel="eigenvalue rank", ylabel="eigenvalue (log)", title="empirical Fisher spectrum")
    ax.legend(fontsize=8, frameon=False)
    return fig


def fisher_curves(tracks: Mapping[str, pd.DataFrame]) -> Figure:
    """Dominant-eigenvalue ratio and spectral entropy over training steps, one line per run (runs whose
    frames carry an ``arm`` column share that arm's colour, with one line style per run of it)."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    groups = [str(f["arm"].iloc[0]) if "arm" in f and len(f) else name for name, f in tracks.items()]
    colors = category_colors(groups)
    styles, seen = ("-", "--", ":", "-."), {}
    for (name, frame), group in zip(tracks.items(), groups):
        style = styles[seen.setdefault(group, []).__len__() % len(styles)]
        seen[group].append(name)
        for ax, column in zip(axes, ("dominant_ratio", "spectral_entropy")):
            ax.plot(frame["step"], frame[column], marker="o", ms=3, color=colors[group], linestyle=style, label=name)
    axes[0].set(xlabel="training step", ylabel="lambda_max / sum(lambda)", title="dominant-eigenvalue ratio")
    axes[1].set(xlabel="training step", ylabel="entropy (nats)", title="spectral entropy")
    axes[0].legend(fontsize=8, frameon=False)
    return fig


def mixing_bars(summary: pd.DataFrame, ax=None, title: str = "mean weight per group") -> Figure:
    """Grouped bars from :func:`~medexplore.analysis.summarize_mixing`: one bar group per row."""
    fig, ax = _new_ax(ax, (max(5, 0.9 * len(summary) + 2), 3.5))
    means, stds = summary["mean"], summary["std"]
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in summary.index]
    width = 0.8 / means.shape[1]
    x = np.arange(len(means))
    for k, (column, color) in enumerate(zip(means.columns, category_colors(means.columns).values())):
        ax.bar(x + (k - (means.shape[1] - 1) / 2) * width, means[column], width, yerr=stds[column], color=color,
               label=str(column), capsize=2)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(ylabel="mean weight", xlabel=" / ".join(map(str, summary.index.names)), title=title)
    if means.shape[1] > 4:  # one bar per latent slot: a legend inside would cover the bars
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, frameon=False)
    return fig


def mixing_histograms(weights: pd.DataFrame, by: pd.Series | None = None, bins: int = 20) -> Figure:
    """One histogram per column of ``weights`` (per-sample weights), split by ``by`` when given."""
    fig = Figure(figsize=(3.2 * weights.shape[1], 3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, weights.shape[1], sharey=True))
    edges = np.linspace(0, max(1e-6, float(weights.to_numpy().max())), bins + 1)
    for ax, column in zip(axes, weights.columns):
        if by is None:
            ax.hist(weights[column], bins=edges, color=OKABE_ITO[4])
        else:
            colors = category_colors(by)
            for name, color in colors.items():
                ax.hist(weights[column][by.astype(str).to_numpy() == name], bins=edges, color=color, alpha=0.6,
                        label=name)
        ax.set(xlabel=f"weight of {column}", ylabel="samples", title=str(column))
    if by is not None:
        axes[-1].legend(fontsize=7, frameon=False, title=by.name)
    return fig


def _overlay_cmap(values: np.ndarray) -> tuple[str, float, float]:
    """Signed maps: a diverging map centred on 0. Non-negative maps (attention, weights): their own
    range, so a nearly uniform map still shows where it is higher (the colour bar gives the values)."""
    if (values < 0).any():
        bound = float(np.abs(values).max()) or 1.0
        return "RdBu_r", -bound, bound
    lo, hi = float(values.min()), float(values.max())
    return "magma", lo, hi if hi > lo else lo + 1.0


def _overlay_rgba(values: np.ndarray, cmap: str, lo: float, hi: float, alpha: float) -> np.ndarray:
    """Colour ``values`` with ``cmap`` and make weak values transparent, so the image stays visible."""
    import matplotlib

    norm = matplotlib.colors.Normalize(lo, hi)
    rgba = matplotlib.colormaps[cmap](norm(values))
    strength = np.abs(values) / max(abs(lo), abs(hi), 1e-12) if lo < 0 else norm(values)
    rgba[..., 3] = alpha * np.clip(strength, 0, 1) ** 0.75
    return rgba


def _colorbar(fig, ax, cmap: str, lo: float, hi: float, **kwargs):
    import matplotlib

    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(lo, hi), cmap)
    return fig.colorbar(mappable, ax=ax, **kwargs)


def overlay_2d(image: np.ndarray, overlay: np.ndarray | None = None, ax=None, alpha: float = 0.85,
               mask: np.ndarray | None = None, title: str = "", colorbar: bool = True) -> Figure:
    """A 2D image (C, H, W) with a map (H, W) on top and an optional mask outline."""
    fig, ax = _new_ax(ax, (4, 4))
    ax.imshow(display_image(image), cmap="gray", interpolation="nearest")
    if overlay is not None:
        overlay = np.asarray(overlay, dtype=np.float32)
        cmap, lo, hi = _overlay_cmap(overlay)
        ax.imshow(_overlay_rgba(overlay, cmap, lo, hi, alpha), interpolation="nearest")
        if colorbar:
            _colorbar(fig, ax, cmap, lo, hi, fraction=0.046, pad=0.04)
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask) > 0, levels=[0.5], colors=[OKABE_ITO[2]], linewidths=1.0)
    ax.set(title=title, xlabel="x (pixels)", ylabel="y (pixels)")
    return fig


def orthoslice_overlay(volume: np.ndarray, overlay: np.ndarray | None = None, point: Sequence[int] | None = None,
                       alpha: float = 0.85, mask: np.ndarray | None = None, title: str = "") -> Figure:
    """Axial, coronal and sagittal slices through ``point`` (default: the overlay's maximum) of a
    (C, D, H, W) volume, each with the map (D, H, W) and optional mask outline on top."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 4:
        raise UserError(f"volume must be (C, D, H, W), got shape {volume.shape}")
    spatial = volume.shape[1:]
    if point is None:
        point = np.unravel_index(np.argmax(overlay), spatial) if overlay is not None else [s // 2 for s in spatial]
    z, y, x = (int(v) for v in point)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    cuts = ((0, z, "axial (z = {})", ("x", "y")), (1, y, "coronal (y = {})", ("x", "z")),
            (2, x, "sagittal (x = {})", ("y", "z")))
    cmap_args = _overlay_cmap(np.asarray(overlay)) if overlay is not None else None
    for ax, (axis, index, name, labels) in zip(axes, cuts):
        take = lambda a, lead=0: np.take(a, index, axis=axis + lead)  # noqa: E731
        ax.imshow(display_image(take(volume, 1)), cmap="gray", interpolation="nearest", origin="lower" if axis else "upper")
        if overlay is not None:
            ax.imshow(_overlay_rgba(take(np.asarray(overlay)), *cmap_args, alpha), interpolation="nearest",
                      origin="lower" if axis else "upper")
        if mask is not None and take(np.asarray(mask)).any():
            ax.contour(take(np.asarray(mask)) > 0, levels=[0.5], colors=[OKABE_ITO[2]], linewidths=1.0)
        ax.set(title=name.format(index), xlabel=labels[0], ylabel=labels[1])
    if overlay is not None:
        _colorbar(fig, axes, *cmap_args, fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title)
    return fig


def explanation_panel(image: np.ndarray, maps: Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                      title: str = "", z: int | None = None) -> Figure:
    """Side by side: the image (with its mask outline) and each map over it. 3D: slice ``z``, by default the
    slice through the first map's maximum."""
    image = np.asarray(image)
    if image.ndim == 4:
        first = np.asarray(next(iter(maps.values())))
        if z is None:
            z = int(np.unravel_index(np.argmax(np.abs(first)), first.shape)[0])
        elif not 0 <= z < image.shape[1]:
            raise UserError(f"z must be in 0..{image.shape[1] - 1}, got {z}")
        image = image[:, z]
        maps = {k: np.asarray(v)[z] for k, v in maps.items()}
        mask = None if mask is None else np.asarray(mask)[z]
        title = f"{title} (slice z = {z})".strip()
    fig = Figure(figsize=(3.3 * (len(maps) + 1), 3.4), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1)
    overlay_2d(image, None, ax=axes[0], mask=mask, title="image" + (" + mask" if mask is not None else ""))
    for ax, (name, values) in zip(axes[1:], maps.items()):
        overlay_2d(image, values, ax=ax, mask=mask, title=name.replace("_", " "), colorbar=True)
    if title:
        fig.suptitle(title)
    return fig
