"""Cheap adaptation of pretrained Medformers (Med-VTAB) and the GMoE-Adapter."""
from .modules import GatedExperts, LoRALinear, ParallelAdapter, PromptTokens, StaticMixture
from .strategies import (STRATEGIES, AdaptConfig, AdaptReport, adapt_model, apply_strategy, merge_lora, rebuild_adaptation,
                         trainable_report)
from .weights import WeightsError, load_backbone_weights, read_weights_file

__all__ = ["STRATEGIES", "AdaptConfig", "AdaptReport", "GatedExperts", "LoRALinear", "ParallelAdapter", "PromptTokens",
           "StaticMixture", "WeightsError", "adapt_model", "apply_strategy", "load_backbone_weights", "merge_lora",
           "read_weights_file", "rebuild_adaptation", "trainable_report"]
