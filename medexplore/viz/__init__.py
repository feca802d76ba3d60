"""Matplotlib figures from analysis results (no Qt; front-ends only place them on screen)."""
from .figures import prediction_gallery, training_curves

__all__ = ["prediction_gallery", "training_curves"]
