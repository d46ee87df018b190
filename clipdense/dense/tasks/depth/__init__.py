"""Monocular depth (NYUv2 / BTS layout; the Monocular-Depth-Estimation-Toolbox's recipes and DINOv2's probe):
config, dataset, head, loss, metric, task."""
