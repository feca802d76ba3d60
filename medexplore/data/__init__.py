"""Samples, collation, MedMNIST and domain-aware sampling."""
from .medmnist import MEDMNIST, MedMNIST, MedMNISTInfo, medmnist_path
from .sample import Sample, collate
from .sampling import ImageCentricView, MixedDataset, PerAnnotationView, WeightedBatchSampler, balanced_weights

__all__ = ["MEDMNIST", "PerAnnotationView", "ImageCentricView", "MedMNIST", "MedMNISTInfo", "MixedDataset", "Sample",
           "WeightedBatchSampler", "balanced_weights", "collate", "medmnist_path"]
