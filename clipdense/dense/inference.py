"""Inference at evaluation size: mmseg-style sliding window, or the whole image padded to the backbone's stride."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE_DIVISOR = 32  # the pyramid's coarsest stride


def _pad(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2]))


def whole_predict(predict, img: torch.Tensor, divisor: int = SIZE_DIVISOR) -> torch.Tensor:
    """`predict` on `img` padded (bottom/right) to a multiple of `divisor`, cropped back to the input size."""
    h, w = img.shape[-2:]
    ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = predict(_pad(img, ph, pw) if (ph, pw) != (h, w) else img)
    return out[..., :h, :w]


def slide_predict(predict, img: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                  batch: int = 4) -> torch.Tensor:
    """mmseg `slide_inference`: windows of `crop` every `stride` (the last one flush with the border), each padded to
    the crop size when the image is smaller; overlapping outputs are averaged. `predict(B,C,h,w) -> (B,K,h,w)`."""
    (hc, wc), (hs, ws) = crop, stride
    n, _, h, w = img.shape
    rows = max(h - hc + hs - 1, 0) // hs + 1
    cols = max(w - wc + ws - 1, 0) // ws + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * hs + hc, h), min(c * ws + wc, w)
            boxes.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    out = count = None
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        crops = torch.cat([_pad(img[..., y1:y2, x1:x2], hc, wc) for y1, y2, x1, x2 in chunk])
        logits = predict(crops).float()
        if out is None:
            out = logits.new_zeros((n, logits.shape[1], h, w))
            count = logits.new_zeros((1, 1, h, w))
        for j, (y1, y2, x1, x2) in enumerate(chunk):
            out[..., y1:y2, x1:x2] += logits[j * n:(j + 1) * n, :, : y2 - y1, : x2 - x1]
            count[..., y1:y2, x1:x2] += 1
    return out / count


# ---- test-time augmentation ----

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's "ms+flip" img_ratios


def tta_views(tta: str, scales=MS_SCALES) -> list[tuple[float, bool]]:
    """(scale ratio, horizontal flip) per view: none = the image as is; flip = it and its mirror; ms_flip = every
    ratio in `scales`, each also mirrored (mmseg's MultiScaleFlipAug)."""
    if tta == "none":
        return [(1.0, False)]
    if tta == "flip":
        return [(1.0, False), (1.0, True)]
    if tta == "ms_flip":
        return [(float(r), f) for r in scales for f in (False, True)]
    raise ValueError(f"unknown tta {tta!r}")


def rescale(img: torch.Tensor, ratio: float) -> torch.Tensor:
    """`img` (B,C,H,W, any dtype) resized bilinearly by `ratio`, back in its own dtype (uint8 rounded and clamped)."""
    size = (max(1, int(img.shape[-2] * ratio + 0.5)), max(1, int(img.shape[-1] * ratio + 0.5)))
    out = F.interpolate(img.float(), size=size, mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(img.dtype) if img.dtype == torch.uint8 else out.to(img.dtype)


def tta_predict(predict, img: torch.Tensor, views: list[tuple[float, bool]], softmax: bool) -> torch.Tensor:
    """Mean over `views` of `predict` (e.g. a slide or whole-image predictor) on the rescaled / mirrored image, each
    output mirrored back and resized bilinearly to the input size. `softmax`: average class probabilities (mmseg's
    aug_test), else the raw outputs (depth). One view of ratio 1 without flip returns `predict(img)` unchanged.
    The ratios apply to the image as given (already at the test scale), so each view is one resampling of it."""
    h, w = img.shape[-2:]
    if views == [(1.0, False)]:
        return predict(img)
    total = None
    for ratio, flip in views:
        x = img if ratio == 1.0 else rescale(img, ratio)
        out = predict(x.flip(-1) if flip else x).float()
        out = out.flip(-1) if flip else out
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        out = out.softmax(1) if softmax else out
        total = out if total is None else total + out
    return total / len(views)
