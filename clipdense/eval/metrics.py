"""The evaluation figures, shared by `clipdense eval` and pretraining's periodic eval (so both report the same).

- `retrieval_metrics`: R@k both ways over paired rows (image->text, text->image) and their mean R@1.
- `classification_scores`: top-1 / top-k and per-class top-1 accuracy from top-k predictions (zero-shot).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """R@k both ways for paired rows (row i of each matches): image->text and text->image, plus their mean."""
    sims = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    n = sims.shape[0]
    target = torch.arange(n)
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)  # how many candidates beat the true pair
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


def classification_scores(topk: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top1 / top-k (k = topk.shape[1]) accuracy and per-class top-1 accuracy from top-k predictions."""
    correct1 = topk[:, 0] == labels
    correctk = (topk == labels[:, None]).any(1)
    n = max(len(labels), 1)
    count = torch.bincount(labels, minlength=num_classes)
    hit = torch.bincount(labels[correct1], minlength=num_classes)
    per_class = [hit[c].item() / count[c].item() if count[c] else None for c in range(num_classes)]
    seen = [a for a in per_class if a is not None]
    return {"top1": correct1.sum().item() / n, "top5": correctk.sum().item() / n, "top5_k": int(topk.shape[1]),
            "mean_per_class": sum(seen) / len(seen) if seen else 0.0,
            "per_class_top1": per_class, "per_class_images": count.tolist()}
