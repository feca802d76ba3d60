"""Matplotlib figures from analysis results (no Qt; front-ends only place them on screen)."""
from .analysis import (
                       OKABE_ITO,
                       category_colors,
                       decodability_bars,
                       eigenvalue_spectra,
                       explanation_panel,
                       fisher_curves,
                       mixing_bars,
                       mixing_histograms,
                       orthoslice_overlay,
                       overlay_2d,
                       principal_angle_heatmap,
                       scatter,
                       variance_bars,
)
from .figures import prediction_gallery, training_curves

__all__ = ["OKABE_ITO", "category_colors", "decodability_bars", "eigenvalue_spectra", "explanation_panel",
           "fisher_curves", "mixing_bars", "mixing_histograms", "orthoslice_overlay", "overlay_2d",
           "prediction_gallery", "principal_angle_heatmap", "scatter", "training_curves", "variance_bars"]
