"""AdamW parameter groups with layer-wise lr decay (mmseg/BEiT rule) and no weight decay on 1-D params and biases."""
from __future__ import annotations

from torch import nn


def layer_decay_param_groups(model: nn.Module, backbone: nn.Module, weight_decay: float,
                             layer_decay: float | None) -> list[dict]:
    """Groups keyed by (layer id, decay?). A backbone parameter's id is `backbone.layer_id(name)`; every other
    parameter (necks outside the backbone, heads) gets the last id. lr_scale = layer_decay ** (N - 1 - id), with
    N = backbone.num_layers, so heads train at the base lr (ViT-B: N = 14, as in mmseg's MAE config)."""
    n = backbone.num_layers
    no_wd_names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    ids = {id(p): (backbone.layer_id(name), name in no_wd_names) for name, p in backbone.named_parameters()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, named_no_wd = ids.get(id(p), (n - 1, False))
        decay = not (p.ndim <= 1 or name.endswith(".bias") or named_no_wd)
        scale = layer_decay ** (n - 1 - layer) if layer_decay else 1.0
        g = groups.setdefault((layer, decay), {"params": [], "param_names": [], "lr_scale": scale, "layer_id": layer,
                                               "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
