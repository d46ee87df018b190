"""Semantic segmentation (ADE20k layout; mmseg's UperNet recipe): config, dataset, head, loss, metric, task."""
