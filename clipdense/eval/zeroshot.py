"""Zero-shot classification, open_clip's way: the classifier is `open_clip.build_zero_shot_classifier` over
(class names x templates), images go through the model's eval preprocessing, logits = 100 * image features @ W.

Pure core (no Ray): `index_folder` lists an ImageFolder as torchvision does (sorted class folders, its image
extensions), `resolve_zeroshot` lists it once with its prompts (a `ZeroShotSet`, what a stage entry resolves before
loading any model), `evaluate_zeroshot` runs a model over it. Unreadable images are skipped and listed with their
error.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from clipdense.config import ConfigError, DataError
from clipdense.data.images import decode_rgb
from clipdense.data.rows import exception_detail
from clipdense.eval.config import ZeroShotConfig
from clipdense.eval.metrics import classification_scores


def open_image(source: str | Path | bytes):
    """An image (a path or encoded bytes) -> RGB PIL image, through the project's one guarded image module."""
    return decode_rgb(source if isinstance(source, bytes) else Path(source).read_bytes())


def default_templates() -> list[str]:
    """open_clip's OPENAI_IMAGENET_TEMPLATES (callables) as format strings with '{}'."""
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def read_lines(path: str, key: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    lines = [line.strip() for line in p.read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"{key}: {path} has no lines")
    return lines


@dataclass
class FolderIndex:
    root: str
    classes: list[str]                 # folder names, sorted (label = index)
    samples: list[tuple[str, int]]     # (path, label), torchvision's order


def index_folder(root: str | None, max_images: int | None = None, key: str = "zeroshot.root") -> FolderIndex:
    if not root or not Path(root).is_dir():
        raise ConfigError(f"{key}: not a directory: {root}")
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:  # no class folders
        raise DataError(f"{key}: {root}: {str(e).splitlines()[0]}") from None
    if not samples:
        raise DataError(f"{key}: {root}: no images ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folders")
    return FolderIndex(str(root), classes, samples[:max_images] if max_images else samples)


def resolve_prompts(index: FolderIndex, classnames: str | None, templates: str | list[str] | None,
                    key: str = "zeroshot") -> tuple[list[str], list[str]]:
    """(class names in label order, templates as format strings)."""
    if classnames:
        names = read_lines(classnames, f"{key}.classnames")
        if len(names) != len(index.classes):
            raise ConfigError(f"{key}.classnames: {classnames} has {len(names)} names but {index.root} has "
                              f"{len(index.classes)} class folders")
    else:
        names = [c.replace("_", " ") for c in index.classes]
    if templates is None:
        temps = default_templates()
    elif isinstance(templates, str):
        temps = read_lines(templates, f"{key}.templates")
        bad = [t for t in temps if "{}" not in t]
        if bad:
            raise ConfigError(f"{key}.templates: {templates}: template {bad[0]!r} has no '{{}}' for the class name")
    else:
        temps = list(templates)
    return names, temps


@dataclass(frozen=True)
class ZeroShotSet:
    """An ImageFolder listed once with its prompts: what a zero-shot evaluation runs over."""
    index: FolderIndex
    classnames: list[str]   # in label order
    templates: list[str]    # format strings with '{}'


def resolve_zeroshot(cfg: ZeroShotConfig, key: str = "zeroshot") -> ZeroShotSet:
    """The folder and prompts of a `zeroshot` section (`key` names it in errors); a bad folder or prompt file is a
    one-line error."""
    index = index_folder(cfg.root, cfg.max_images, f"{key}.root")
    return ZeroShotSet(index, *resolve_prompts(index, cfg.classnames, cfg.templates, key))


class FolderImages(torch.utils.data.Dataset):
    """(image tensor | None, label, error | None) per sample: a bad file becomes an error, not a crash."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return self.transform(open_image(path)), label, None
        except Exception as e:  # noqa: BLE001 - any undecodable file is recorded, not fatal
            return None, label, f"{path}: {exception_detail(e)}"  # deterministic text, as row errors


def _collate(items):
    ok = [(x, y) for x, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    if not ok:
        return None, None, errors
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok]), errors


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, preprocess, index: FolderIndex, classnames: list[str], templates: list[str],
                      *, device: torch.device, autocast_dtype: torch.dtype | None = None, batch_size: int = 64,
                      workers: int = 0, classes_per_batch: int = 10) -> dict:
    """Zero-shot accuracy of `model` on `index`; `preprocess` is the model's eval transform (PIL -> tensor)."""
    with autocast_for(device, autocast_dtype):
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                num_classes_per_batch=classes_per_batch, device=device)
    loader = torch.utils.data.DataLoader(FolderImages(index.samples, preprocess), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    k = min(5, len(classnames))
    preds, labels, errors = [], [], []
    t0 = time.perf_counter()
    for images, y, errs in loader:
        errors += errs
        if images is None:
            continue
        with autocast_for(device, autocast_dtype):
            feats = model.encode_image(images.to(device), normalize=True)
            logits = 100.0 * feats @ classifier
        preds.append(logits.float().topk(k, dim=1).indices.cpu())
        labels.append(y)
    elapsed = time.perf_counter() - t0
    if not preds:
        raise DataError(f"zeroshot.root: {index.root}: none of its {len(index.samples)} images could be read "
                        f"(first: {errors[0]})")
    out = classification_scores(torch.cat(preds), torch.cat(labels), len(classnames))
    counts, accs = out.pop("per_class_images"), out.pop("per_class_top1")
    per_class = [{"folder": f, "name": n, "images": c, "top1": a}
                 for f, n, c, a in zip(index.classes, classnames, counts, accs)]
    n_ok = sum(len(y) for y in labels)
    return {**out, "images": n_ok, "images_per_s": n_ok / max(elapsed, 1e-9), "per_class": per_class,
            "classnames": classnames, "templates": templates, "root": index.root, "errors": errors}
