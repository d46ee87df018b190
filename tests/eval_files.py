"""A small ImageFolder for the eval tests: coloured shapes, one folder per class."""
from __future__ import annotations

import numpy as np
from PIL import Image
from pretrain_files import shape_jpeg

CLASSES = {"blue_circle": ("blue", "circle"), "red_square": ("red", "square"), "yellow_circle": ("yellow", "circle")}


def write_folder(root, per_class=(4, 3, 5), seed=0):
    """An ImageFolder of coloured shapes, one folder per class, unequal class sizes; one PNG among the JPEGs."""
    rng = np.random.default_rng(seed)
    for (folder, (colour, shape)), n in zip(CLASSES.items(), per_class):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i:03d}.jpg").write_bytes(shape_jpeg(colour, shape, rng, size=72))
    Image.open(root / "red_square" / "000.jpg").save(root / "red_square" / "zz.png")
    return root
