"""`clipdense eval` zero-shot images/s vs a plain loop (same model, images, preprocessing; one process each).

    python -m bench.eval_zeroshot [--classes 10] [--per-class 60] [--rounds 2] [--quick]

Ours: `clipdense.eval.zeroshot.evaluate_zeroshot` (an ImageFolder index, open_clip's zero-shot classifier, a
DataLoader in this process, per-image error handling). Peer: the loop a user writes by hand — open each file with
PIL, the model's eval transform, stack, `encode_image`, logits against the same classifier, top-5. Both time the
image loop only (the classifier is built once, outside the timing). The two alternate, each round after the
machine has cooled down. Writes bench/results/eval_zeroshot.{json,md}. Goal: ours >= 0.8x the plain loop.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from bench.common import RoundLoads, parse_bench_args, row, write_report
from clipdense.eval.model import load_model
from clipdense.eval.zeroshot import evaluate_zeroshot, index_folder, resolve_prompts


def make_folder(root: Path, classes: int, per_class: int, px: int = 320) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (px * 3 // 4, px, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)


@torch.no_grad()
def plain_loop(model, preprocess, classifier, samples, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        ims = []
        for path, _ in samples[i:i + batch_size]:
            with Image.open(path) as im:
                ims.append(preprocess(im.convert("RGB")))
        feats = model.encode_image(torch.stack(ims), normalize=True)
        (100.0 * feats @ classifier).topk(5, dim=1)
    return len(samples) / (time.perf_counter() - t0)


def main(quick: bool = False, argv: list[str] | None = None) -> list[dict]:
    a = parse_bench_args("python -m bench.eval_zeroshot", argv, quick, model="clip-tiny", classes=10, per_class=60,
                         batch=64, rounds=2)
    if a.quick:
        a.per_class, a.rounds = 10, 1
    torch.set_num_threads(1)  # one core each side: a shared box's oversubscribed threads swing per-image ops
    model, preprocess, tokenizer = load_model(a.model, None)
    loads, ours, plain = RoundLoads(quick=a.quick), [], []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        make_folder(Path(tmp), a.classes, a.per_class)
        index = index_folder(tmp)
        names, templates = resolve_prompts(index, None, ["a photo of a {}."])
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, templates,
                                                          device=torch.device("cpu"))
        for _ in range(a.rounds):
            loads.start_round()
            plain.append(plain_loop(model, preprocess, classifier, index.samples, a.batch))
            loads.start_round()
            ours.append(evaluate_zeroshot(model, tokenizer, preprocess, index, names, templates,
                                          device=torch.device("cpu"), batch_size=a.batch)["images_per_s"])
    n = a.classes * a.per_class
    note = (f"{a.model}, {n} JPEGs 320x240 in {a.classes} classes, batch {a.batch}, CPU fp32, 1 thread, "
            f"best of {a.rounds} alternating rounds; runs ours {[round(x) for x in ours]}, plain "
            f"{[round(x) for x in plain]}; {loads.note()}")
    rows = [row("eval", "zero-shot images/s (clipdense eval core vs plain loop)", max(ours), max(plain),
                "plain PIL + eval transform + encode_image loop", "images/s", notes=note, rounds=loads)]
    print(write_report("eval_zeroshot", "Zero-shot evaluation: clipdense eval vs a plain loop", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])
