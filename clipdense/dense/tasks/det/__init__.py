"""Object detection and instance segmentation (COCO layout; torchvision Faster R-CNN, ViTDet's Mask R-CNN):
config, dataset, head, metric, task (torchvision's models compute their own losses)."""
