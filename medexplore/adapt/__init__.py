"""Cheap adaptation of pretrained Medformers (Med-VTAB) and the GMoE-Adapter: model surgery only.

Loading the pretrained weights an adaptation starts from is :func:`medexplore.train.weights.adapt_model`.
"""
from .modules import GatedExperts, LoRALinear, ParallelAdapter, PromptTokens, StaticMixture
from .strategies import (
                         STRATEGIES,
                         AdaptConfig,
                         AdaptReport,
                         apply_strategy,
                         merge_lora,
                         model_from_spec,
                         rebuild_adaptation,
                         trainable_report,
)

__all__ = ["STRATEGIES", "AdaptConfig", "AdaptReport", "GatedExperts", "LoRALinear", "ParallelAdapter", "PromptTokens",
           "StaticMixture", "apply_strategy", "merge_lora", "model_from_spec", "rebuild_adaptation", "trainable_report"]
