"""Medformer and its parts."""
from .config import DomainVocab, MedformerConfig
from .heads import LabelError
from .inference_defaults import InferenceDefaults
from .kinds import KINDS, KindEntry, kind_entry, register_kind
from .medformer import Medformer, MedformerOutput
from .packing import Batch, TokenLayout
from .registry import create_model, list_models, register_model
from .tasks import Domain, TaskKind, TaskSpec
from .timm_weights import load_timm_weights

__all__ = ["KINDS", "KindEntry", "kind_entry", "register_kind", "Batch", "Domain", "DomainVocab", "InferenceDefaults", "LabelError",
           "Medformer", "MedformerConfig", "MedformerOutput",
           "TaskKind", "TaskSpec", "TokenLayout", "create_model", "list_models", "load_timm_weights",
           "register_model"]
