"""Training crops decoded on the train worker's device (`data.decode_on: gpu`): torchvision's batched nvJPEG.

Ray Data then only checks each image's header (the pixel guard) and ships the encoded bytes with the original size
(pretrain/data.py); the collate (pretrain/batches.py) draws each sample's RandomResizedCrop box on that original
geometry exactly as the CPU path does (pretrain/crops.py: `sample_box`), and `decode_crops` here
decodes the batch with `torchvision.io.decode_jpeg(list, device=...)` at full size, cuts each box and resizes it
bicubic with antialias on the device. Crops stay a pure function of (seed, epoch, key); the pixels differ from the
CPU path's only by its JPEG-draft reduction and uint8 rounding (a level or two). Rows that are not JPEG (PNG, WebP)
or that the decoder refuses (CMYK, some progressive files) are decoded on the CPU (PIL, guarded), cropped the same
way and counted. On device "cpu" the same code runs with libjpeg: that is how the tests check it without a GPU.
torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not installed here); `decode_jpeg` still
works and is the one call to replace when it goes.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from clipdense.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from clipdense.pretrain.crops import source_box, undecodable_row

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return bytes(data[:3]) == JPEG_MAGIC


def _cpu_decode(data: bytes, max_pixels: int) -> torch.Tensor:
    """PIL's whole-image RGB decode (guarded) -> (3, h, w) uint8."""
    return torch.from_numpy(np.asarray(decode_rgb(data, max_pixels), dtype=np.uint8).copy()).permute(2, 0, 1)


def _device_decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """The batch in one decoder call; when that fails, one by one (None: this row is refused)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad row fails the whole batched call
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _resized(image: torch.Tensor, box: tuple, size: int) -> torch.Tensor:
    """(3, h, w) uint8 on any device, an integer pixel box -> (3, size, size) float in 0..255, bicubic antialias."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = image[:, y1:y2, x1:x2].unsqueeze(0).float()
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0].clamp_(0, 255)


def decode_crops(datas: list[bytes], origs: list[tuple[int, int]], boxes: list[tuple], size: int,
                 device: str | torch.device, max_pixels: int = DEFAULT_MAX_PIXELS,
                 keys: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """Encoded images, their original (w, h), crop boxes (x1, y1, x2, y2) on that original geometry -> ((B, 3, size,
    size) float in 0..255 on `device`, rows decoded on the CPU instead). A decode whose size is not the header's
    (an odd file) has its box scaled to it, as the CPU path maps boxes to a draft-reduced copy. A row no decoder
    reads (its header passed Ray Data's check, its pixels are broken) is a one-line DataError naming its key: dropping
    it here would leave this worker's batch smaller than the others' (the contrastive loss gathers equal batches)."""
    device = torch.device(device)
    jpeg = [i for i, d in enumerate(datas) if is_jpeg(d)]
    with warnings.catch_warnings():  # read-only bytes from Arrow: only read
        warnings.simplefilter("ignore", UserWarning)
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
    decoded: list[torch.Tensor | None] = [None] * len(datas)
    for i, im in zip(jpeg, _device_decode(tensors, device)):
        decoded[i] = im
    fallbacks = 0
    out = torch.empty((len(datas), 3, size, size), dtype=torch.float32, device=device)
    for i, (data, (ow, oh), box) in enumerate(zip(datas, origs, boxes)):
        im = decoded[i]
        if im is None:  # PNG/WebP, or refused by the device decoder: PIL on the CPU, then the same crop
            try:
                im = _cpu_decode(data, max_pixels).to(device, non_blocking=True)
            except ImageError as e:
                raise undecodable_row(keys[i] if keys else f"row {i}", e, "gpu") from None
            fallbacks += 1
        h, w = im.shape[-2:]
        out[i] = _resized(im, source_box(box, int(ow), int(oh), w, h), size)
    return out, fallbacks
