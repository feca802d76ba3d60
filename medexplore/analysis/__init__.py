"""Analyses that return plain arrays and DataFrames (no plotting, no Qt, no notebook code).

- embeddings: :func:`compute_embeddings` -> :class:`EmbeddingSet` (save / :func:`load_embeddings`)
- projections: :func:`pca`, :func:`umap`, :func:`project` (cached on disk)
- subspaces: :func:`analyze_subspaces` (shared vs modality-specific), :func:`principal_angles`
- mixing: :func:`domain_attention` (Input-Adaptformer latents), :func:`gate_weights` (GMoE gates),
  :func:`summarize_mixing` (either)
- attribution: :func:`attention_rollout`, :func:`attention_map`, :func:`integrated_gradients`,
  :func:`grad_cam`, :func:`explain` (:func:`explain_images` for a batch)
- fisher: :func:`fisher_spectrum`, :func:`fisher_over_checkpoints`
- selection: :func:`nearest_neighbours`, :func:`points_in_polygon`, :func:`points_in_box`
"""
from .attribution import (
                          ATTRIBUTION_METHODS,
                          Explanation,
                          attention_map,
                          attention_rollout,
                          explain,
                          explain_images,
                          grad_cam,
                          integrated_gradients,
                          token_map_to_image,
)
from .embeddings import EmbeddingSet, compute_embeddings, iter_compute_embeddings, load_embeddings
from .fisher import (
                          FisherSpectrum,
                          fisher_over_checkpoints,
                          fisher_spectrum,
                          last_blocks,
                          per_sample_gradients,
                          select_parameters,
                          spectrum_summary,
)
from .mixing import MixingWeights, domain_attention, domain_attention_maps, gate_weights, summarize_mixing
from .predictions import predict_samples
from .projections import Projection, exact_neighbors, pca, project, umap
from .selection import nearest_neighbours, nearest_point, points_in_box, points_in_polygon
from .subspaces import SubspaceAnalysis, analyze_subspaces, linear_decodability, principal_angles, principal_subspace

__all__ = ["ATTRIBUTION_METHODS", "EmbeddingSet", "Explanation", "FisherSpectrum", "MixingWeights", "Projection",
           "SubspaceAnalysis", "analyze_subspaces", "attention_map", "attention_rollout", "compute_embeddings",
           "domain_attention", "domain_attention_maps", "exact_neighbors", "explain", "explain_images",
           "gate_weights", "fisher_over_checkpoints", "fisher_spectrum",
           "grad_cam", "integrated_gradients", "iter_compute_embeddings", "last_blocks", "linear_decodability", "load_embeddings",
           "nearest_neighbours", "nearest_point", "pca", "per_sample_gradients", "points_in_box",
           "points_in_polygon", "predict_samples", "principal_angles", "principal_subspace", "project",
           "select_parameters", "spectrum_summary", "summarize_mixing", "token_map_to_image", "umap"]
