"""Load timm VisionTransformer weights into a Medformer (a checkpoint filter, as in timm)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from .medformer import Medformer

__all__ = ["timm_to_medformer", "load_timm_weights"]

_DROPPED_PREFIXES = ("head.", "fc_norm.", "attn_pool.")


def _check_variant(state_dict: dict[str, Tensor], model: Medformer) -> None:
    """Refuse, in one line, the timm ViT variants whose computation a Medformer does not reproduce."""
    if "reg_token" in state_dict:
        raise UserError(f"timm ViT with {state_dict['reg_token'].shape[1]} register tokens (reg_tokens) cannot be "
                         "loaded: a Medformer has no register tokens")
    if "fc_norm.weight" in state_dict and "norm.weight" not in state_dict:
        raise UserError("timm ViT with global_pool='avg' (fc_norm after pooling, no final norm) cannot be loaded "
                         "exactly: a Medformer normalises tokens before pooling; use a class-token ViT")
    has_scale, scale = any(k.endswith(".ls1.gamma") for k in state_dict), model.config.layer_scale
    if has_scale != (scale is not None):
        raise UserError(f"timm ViT {'has' if has_scale else 'has no'} LayerScale (init_values) but the model was built "
                         f"with layer_scale={scale}; build it with layer_scale={'a value, e.g. 1e-5' if has_scale else None}")
    has_cls = "cls_token" in state_dict
    if has_cls != (model.cls_token is not None):
        raise UserError(f"timm ViT {'has' if has_cls else 'has no'} class token but the model was built with "
                         f"class_token={model.cls_token is not None}; build it with class_token={has_cls}")


def timm_to_medformer(state_dict: dict[str, Tensor], model: Medformer) -> dict[str, Tensor]:
    """Remap a timm ViT state dict to Medformer keys; resample ``pos_embed`` to the model's grid.

    Handles class-token ViTs with positions on the class token (timm's default) or without
    (``no_embed_class=True``: the class token's position is zero); refuses register tokens and
    ``global_pool='avg'`` with a ValueError.
    """
    _check_variant(state_dict, model)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_DROPPED_PREFIXES) or key == "norm_pre.weight" or key == "norm_pre.bias":
            continue
        if key == "pos_embed":
            if model.pos is None:
                continue
            key, value = "pos.pos_embed", _resample_pos(value, model)
        out[key] = value
    if "patch_embed.proj.weight" in out:
        out.update(inflate_patch_embed(out["patch_embed.proj.weight"], out.get("patch_embed.proj.bias")))
    return out


def inflate_patch_embed(weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """3D patch kernel from a 2D one (I3D inflation): repeated over depth and divided by it, so a
    volume of identical slices embeds like one slice."""
    depth = weight.shape[-1]
    out = {"patch_embed.proj_3d.weight": weight[:, :, None].repeat(1, 1, depth, 1, 1) / depth}
    if bias is not None:
        out["patch_embed.proj_3d.bias"] = bias.clone()
    return out


def _resample_pos(pos: Tensor, model: Medformer) -> Tensor:
    """timm's (1, prefix + H*W, D) table on the model's (z, y, x) grid: resampled in-plane, then
    repeated along z (every slice of a volume gets the 2D positions; z = 0 is exactly timm's)."""
    grid = model.pos.grid
    prefix = model.config.num_prefix_tokens
    side = round((pos.shape[1]) ** 0.5)
    if prefix and side * side == pos.shape[1]:  # no_embed_class: no position for the class token, i.e. zero
        pos = torch.cat([pos.new_zeros(1, prefix, pos.shape[2]), pos], 1)
    if pos.shape[1] - prefix != grid[1] * grid[2]:
        from timm.layers import resample_abs_pos_embed
        pos = resample_abs_pos_embed(pos, list(grid[1:]), num_prefix_tokens=prefix)
    if grid[0] > 1:
        pos = torch.cat([pos[:, :prefix], pos[:, prefix:].repeat(1, grid[0], 1)], 1)
    return pos


def load_timm_weights(model: Medformer, state_dict: dict[str, Tensor], strict_body: bool = True):
    """Copy a timm ViT's patch embedding, positions, blocks and final norm into ``model``.

    Returns the ``(missing, unexpected)`` keys of the load; with ``strict_body`` a body parameter
    (``patch_embed.proj``, ``blocks.*``, ``norm``) missing from ``state_dict`` raises a ValueError.
    """
    mapped = timm_to_medformer(state_dict, model)
    own = model.state_dict()
    shapes = [f"{k}: timm {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in mapped.items()
              if k in own and own[k].shape != v.shape]
    if shapes:
        raise UserError(f"timm weights do not fit this model (width, depth or patch size differ): {shapes[:3]}")
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise UserError(f"timm weights have keys the Medformer lacks: {result.unexpected_keys[:5]}")
    body = [k for k in result.missing_keys
            if k.startswith(("patch_embed.proj.", "blocks.", "norm.")) or k == "cls_token"]
    if strict_body and body:
        raise UserError(f"timm weights lack body parameters: {body[:5]}")
    return result.missing_keys, result.unexpected_keys
