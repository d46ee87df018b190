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
