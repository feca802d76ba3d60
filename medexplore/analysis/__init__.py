"""Analyses that return plain arrays (no plotting)."""
from .predictions import predict_samples

__all__ = ["predict_samples"]
