"""Load timm VisionTransformer weights into a Medformer (a checkpoint filter, as in timm)."""
from __future__ import annotations

from torch import Tensor

from .medformer import Medformer

__all__ = ["timm_to_medformer", "load_timm_weights"]

_DROPPED_PREFIXES = ("head.", "fc_norm.", "attn_pool.")


def timm_to_medformer(state_dict: dict[str, Tensor], model: Medformer) -> dict[str, Tensor]:
    """Remap a timm ViT state dict to Medformer keys; resample ``pos_embed`` to the model's grid."""
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
    grid = model.pos.grid
    prefix = model.config.num_prefix_tokens
    if grid[0] != 1:
        raise ValueError(f"timm position embeddings are 2D; the model's pos_grid {grid} must have z = 1")
    if pos.shape[1] - prefix == grid[1] * grid[2]:
        return pos
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(pos, list(grid[1:]), num_prefix_tokens=prefix)


def load_timm_weights(model: Medformer, state_dict: dict[str, Tensor], strict_body: bool = True):
    """Copy a timm ViT's patch embedding, positions, blocks and final norm into ``model``.

    Returns the ``(missing, unexpected)`` keys of the load; with ``strict_body`` a body parameter
    (``patch_embed.proj``, ``blocks.*``, ``norm``) missing from ``state_dict`` raises a ValueError.
    """
    mapped = timm_to_medformer(state_dict, model)
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"timm weights have keys the Medformer lacks: {result.unexpected_keys[:5]}")
    body = [k for k in result.missing_keys
            if k.startswith(("patch_embed.proj.", "blocks.", "norm.")) or k == "cls_token"]
    if strict_body and body:
        raise ValueError(f"timm weights lack body parameters: {body[:5]}")
    return result.missing_keys, result.unexpected_keys
