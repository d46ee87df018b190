"""AdamW parameter groups with layer-wise lr decay and no weight decay on 1-D params and biases.

Every trainable parameter gets a layer id; lr_scale = decay ** (head_id - id), so the head trains at the base lr
(the exponent base of mmseg's LearningRateDecayOptimizerConstructor: num_layers + 2 ids, scale
decay ** (num_layers + 1 - id)). The ids per backbone family:

- `vit` (open_clip ViTs, plain timm ViTs): 0 = patch embed, cls token, positional embedding, ln_pre; i + 1 = block i;
  depth + 1 = everything else (neck, heads) -- mmseg's MAE/BEiT rule (ViT-B: 14 ids, stem scale 0.65 ** 13).
- `hierarchical` (timm models with stages of several strides: fastvit_mci*, swin, convnext, resnet, ...): 0 = stem;
  the stages' blocks share `STAGE_IDS` ids (fewer when there are fewer blocks), each stage getting a share of ids
  proportional to its depth (at least one) and its blocks spread evenly over that share (a stage's downsample goes
  with its first block, as timm's group_matcher puts it); STAGE_IDS + 1 = everything else. Stages and blocks come
  from timm's own `group_matcher` (coarse: stages, fine: blocks). For ConvNeXt-B (3, 3, 27, 3) this is exactly
  mmseg's `get_layer_id_for_convnext` with num_layers 12; fastvit_mci0 (2, 6, 10, 2) gets 1, 4, 6, 1 ids per stage,
  fastvit_mci2 (4, 12, 24, 4) 1, 3, 7, 1; Swin-T (2, 2, 6, 2) one id per block.

`layer_decay: auto` takes the family's default (`DEFAULT_LAYER_DECAY`): ViT 0.65 as mmseg's MAE ViT-B UperNet;
hierarchical 0.9 as mmseg's ConvNeXt UperNet configs (decay_rate 0.9, num_layers 12), whose stem scale 0.9 ** 13
this table reproduces.
"""
from __future__ import annotations

import re
from collections import defaultdict

from timm.models import group_parameters
from torch import nn

from clipdense.config import ConfigError
from clipdense.dense.backbones import backbone_family

DEFAULT_LAYER_DECAY = {"vit": 0.65, "hierarchical": 0.9}
STAGE_IDS = 12  # body ids of a hierarchical tower (mmseg ConvNeXt: num_layers 12)


def share_ids(depths: list[int], budget: int = STAGE_IDS) -> list[int]:
    """Ids per stage: proportional to depth (largest remainder), at least 1 and at most the depth, summing to
    min(budget, sum(depths))."""
    budget = min(budget, sum(depths))
    quota = [budget * d / sum(depths) for d in depths]
    n = [min(d, max(1, int(q))) for d, q in zip(depths, quota)]
    while sum(n) < budget:  # give the next id to the stage furthest below its quota
        i = max((i for i in range(len(n)) if n[i] < depths[i]), key=lambda i: quota[i] - n[i])
        n[i] += 1
    while sum(n) > budget:  # (the minimum of 1 overshot) take from the stage furthest above its quota
        i = max((i for i in range(len(n)) if n[i] > 1), key=lambda i: n[i] - quota[i])
        n[i] -= 1
    return n


def _matches(matcher, name: str) -> bool:
    specs = [s if isinstance(s, (list, tuple)) else [(s, None)] for s in matcher.values() if s is not None]
    return any(re.match(spec[0], name) for group in specs for spec in group)


def hierarchical_layer_ids(model: nn.Module, budget: int = STAGE_IDS) -> tuple[dict[str, int], int]:
    """({parameter name: id}, head id) for a timm hierarchical model (see the module docstring); names the
    matcher does not know (a final conv, a head) are left out, i.e. go with the head."""
    coarse_m, fine_m = model.group_matcher(coarse=True), model.group_matcher(coarse=False)
    if not isinstance(coarse_m, dict) or not isinstance(fine_m, dict):
        raise ConfigError(f"{type(model).__name__}: timm group_matcher is not a dict; layer_decay needs stages "
                          "(set train.optim.layer_decay: null)")
    coarse = group_parameters(model, coarse_m, reverse=True)
    fine = group_parameters(model, fine_m, reverse=True)
    known = [n for n, _ in model.named_parameters() if _matches(coarse_m, n)]
    stems = {coarse[n] for n in known if _matches({"stem": coarse_m.get("stem")}, n)}
    blocks: dict[int, list[int]] = defaultdict(list)  # stage ordinal -> its fine ordinals, in order
    for n in known:
        if coarse[n] not in stems and fine[n] not in blocks[coarse[n]]:
            blocks[coarse[n]].append(fine[n])
    stages = sorted(s for s in blocks if blocks[s])
    depths = [len(blocks[s]) for s in stages]
    shares = share_ids(depths, budget) if depths else []
    first, block_id = 1, {}
    for s, d, k in zip(stages, depths, shares):
        for j, f in enumerate(sorted(blocks[s])):
            block_id[(s, f)] = first + j * k // d
        first += k
    ids = {n: 0 if coarse[n] in stems else block_id[(coarse[n], fine[n])] for n in known}
    return ids, first


class LayerIds:
    """Layer id of every backbone parameter name (prefixed as in the backbone), by family; `head` for the rest."""

    def __init__(self, backbone: nn.Module):
        self.family = backbone_family(backbone)
        if self.family == "hierarchical":
            ids, self.head = hierarchical_layer_ids(backbone.model)
            self.ids = {f"model.{n}": i for n, i in ids.items()}
        else:
            self.head = backbone.num_layers - 1
            self.ids = {n: backbone.layer_id(n) for n, _ in backbone.named_parameters()}

    def __call__(self, name: str) -> int:
        return min(self.ids.get(name, self.head), self.head)


def resolve_layer_decay(layer_decay: float | str | None, family: str) -> float | None:
    return DEFAULT_LAYER_DECAY[family] if layer_decay == "auto" else layer_decay


def layer_decay_param_groups(model: nn.Module, backbone: nn.Module, weight_decay: float,
                             layer_decay: float | str | None, min_lr_scale: float = 0.0,
                             trunk_lr_scale: float = 1.0) -> list[dict]:
    """Groups keyed by (layer id, decay?, in the trunk?), each with `lr_scale`, `layer_id`, `param_names`. A backbone
    parameter's id comes from `LayerIds(backbone)`; every other parameter (necks outside the backbone, heads) gets
    the head id. `layer_decay`: a number, "auto" (the family default) or None (off). `trunk_lr_scale`
    (`backbone.lr_scale`, the Toolbox's DPT: x0.1) multiplies the trunk's scales (not the neck's). A group whose
    final lr_scale falls below `min_lr_scale` is a ConfigError: such a layer would effectively be frozen."""
    table = LayerIds(backbone)
    decay_rate = resolve_layer_decay(layer_decay, table.family)
    by_param = {id(p): name for name, p in backbone.named_parameters()}
    trunk = {id(p) for p in getattr(backbone, backbone.trunk_name).parameters()} if trunk_lr_scale != 1.0 else set()
    no_wd_names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bb_name = by_param.get(id(p))
        layer = table(bb_name) if bb_name is not None else table.head
        decay = not (p.ndim <= 1 or name.endswith(".bias") or bb_name in no_wd_names)
        in_trunk = id(p) in trunk
        scale = (decay_rate ** (table.head - layer) if decay_rate else 1.0) * (trunk_lr_scale if in_trunk else 1.0)
        g = groups.setdefault((layer, decay, in_trunk), {"params": [], "param_names": [], "lr_scale": scale,
                                                         "layer_id": layer,
                                                         "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    out = [groups[k] for k in sorted(groups)]
    low = min(out, key=lambda g: g["lr_scale"], default=None)
    if low is not None and low["lr_scale"] < min_lr_scale:
        trunk_note = f" with backbone.lr_scale {trunk_lr_scale:g}" if trunk_lr_scale != 1.0 else ""
        raise ConfigError(
            f"train.optim.layer_decay {decay_rate}{trunk_note} gives {low['param_names'][0]} (layer {low['layer_id']} "
            f"of {table.head}, {table.family}) lr scale {low['lr_scale']:.3g} < train.optim.min_lr_scale "
            f"{min_lr_scale:g}; raise layer_decay or lower min_lr_scale")
    return out


def lr_scale_record(groups: list[dict], layer_decay: float | str | None, family: str) -> dict:
    """What metrics.json records about the optimizer groups (JSON-ready)."""
    return {"layer_decay": {"family": family, "rate": resolve_layer_decay(layer_decay, family),
                            "head_id": max((g["layer_id"] for g in groups), default=0)},
            "lr_scales": [{"layer_id": g["layer_id"], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                           "tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
                           "first": g["param_names"][0], "last": g["param_names"][-1]} for g in groups]}
