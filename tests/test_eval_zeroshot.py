"""`clipdense eval`: zero-shot classification against open_clip's own classifier and a hand-computed argmax;
eval.json fields; class names file; retrieval on shards; bad input is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from eval_files import CLASSES, write_folder
from PIL import Image
from pretrain_files import write_world

from clipdense.cli import main as cli_main
from clipdense.config import build_config
from clipdense.eval import EvalStageConfig, run
from clipdense.eval.model import load_model
from clipdense.models import create_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random clip-tiny saved as a local state dict (model.pretrained), with its folder and eval.json."""
    d = tmp_path_factory.mktemp("zs")
    torch.manual_seed(0)
    torch.save(create_clip("clip-tiny").state_dict(), d / "model.pt")
    root = write_folder(d / "folder")
    cfg = build_config(EvalStageConfig, {"model": {"name": "clip-tiny", "pretrained": str(d / "model.pt")},
                                         "zeroshot": {"root": str(root), "batch_size": 4}, "out": str(d / "out")})
    summary = run(cfg)
    return d, root, summary, json.loads((d / "out" / "eval.json").read_text())


def hand_predictions(weights, root, classnames, templates):
    """open_clip's classifier + its eval transform + a manual argmax, image by image in sorted folder order."""
    model, _, preprocess = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(weights))
    model.eval()
    tok = open_clip.get_tokenizer("clip-tiny")
    with torch.no_grad():
        w = open_clip.build_zero_shot_classifier(model, tok, classnames, templates, num_classes_per_batch=2)
        labels, preds = [], []
        for label, folder in enumerate(sorted(p.name for p in root.iterdir())):
            for f in sorted((root / folder).iterdir()):
                x = preprocess(Image.open(f).convert("RGB"))[None]
                preds.append(int((model.encode_image(x, normalize=True) @ w).argmax()))
                labels.append(label)
    return np.array(labels), np.array(preds)


def test_top1_matches_open_clip_hand_computation(tiny):
    d, root, summary, ev = tiny
    z = ev["zeroshot"]
    assert z["classnames"] == ["blue circle", "red square", "yellow circle"]
    assert z["templates"] == [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES] and len(z["templates"]) == 80
    labels, preds = hand_predictions(d / "model.pt", root, z["classnames"], z["templates"])
    assert z["images"] == len(labels) == 13 and z["errors"] == []
    assert z["top1"] == pytest.approx((labels == preds).mean(), abs=1e-9)
    assert summary["zeroshot"]["top1"] == z["top1"] and summary["zeroshot"]["errors"] == 0
    # 3 classes: top-k with k = 3 covers every class
    assert z["top5_k"] == 3 and z["top5"] == 1.0


def test_per_class_accuracy_is_consistent(tiny):
    d, root, _, ev = tiny
    z = ev["zeroshot"]
    labels, preds = hand_predictions(d / "model.pt", root, z["classnames"], z["templates"])
    assert [c["folder"] for c in z["per_class"]] == sorted(CLASSES)
    assert [c["images"] for c in z["per_class"]] == [4, 4, 5]  # red_square holds the extra PNG
    for k, c in enumerate(z["per_class"]):
        assert c["top1"] == pytest.approx((preds[labels == k] == k).mean())
    weighted = sum(c["top1"] * c["images"] for c in z["per_class"]) / z["images"]
    assert weighted == pytest.approx(z["top1"])
    assert z["mean_per_class"] == pytest.approx(np.mean([c["top1"] for c in z["per_class"]]))
    assert ev["model"]["pretrained"] == str(d / "model.pt") and ev["config"]["zeroshot"]["root"] == str(root)


def test_classnames_file_templates_and_bad_images(tiny, tmp_path):
    d, root, _, _ = tiny
    (root / "blue_circle" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    names = tmp_path / "names.txt"
    names.write_text("azure disc\ncrimson box\n\ngolden disc\n")
    cfg = build_config(EvalStageConfig, {
        "model": {"pretrained": str(d / "model.pt")}, "out": str(tmp_path / "out"),
        "zeroshot": {"root": str(root), "classnames": str(names), "templates": ["a {}.", "a photo of the {}."]}})
    run(cfg)
    z = json.loads((tmp_path / "out" / "eval.json").read_text())["zeroshot"]
    (root / "blue_circle" / "broken.jpg").unlink()
    assert z["classnames"] == ["azure disc", "crimson box", "golden disc"]
    assert z["templates"] == ["a {}.", "a photo of the {}."]
    assert z["images"] == 13 and len(z["errors"]) == 1 and "broken.jpg" in z["errors"][0]
    labels, preds = hand_predictions(d / "model.pt", root, z["classnames"], z["templates"])
    assert z["top1"] == pytest.approx((labels == preds).mean())


@pytest.mark.parametrize("overrides,needle", [
    (["zeroshot.root={tmp}/missing"], "zeroshot.root: not a directory"),
    (["zeroshot.root={tmp}"], "no images"),
    (["zeroshot.root={root}", "zeroshot.classnames={tmp}/two.txt"], "has 2 names but"),
    (["zeroshot.root={root}", "zeroshot.templates=[a photo]"], "has no '{{}}'"),
    (["zeroshot.root={root}", "model.pretrained={tmp}/nope.pt"], "model.pretrained"),
    ([], "set zeroshot.root and/or retrieval.shards"),
])
def test_bad_input_is_one_line_error(tiny, tmp_path, capsys, overrides, needle):
    _, root, _, _ = tiny
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "two.txt").write_text("a\nb\n")
    args = [o.format(tmp=tmp_path, root=root) for o in overrides]
    rc = cli_main(["eval", f"out={tmp_path}/out", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle.replace("{{}}", "{}") in err and len(err.strip().splitlines()) == 1, err


def test_retrieval_on_shards(ray_local, tiny, tmp_path):
    d, _, _, _ = tiny
    world = write_world(tmp_path / "world", n_shards=1, per_shard=12, bad=True)
    rc = cli_main(["eval", f"model.pretrained={d / 'model.pt'}", f"retrieval.shards={world['shards']}",
                   f"out={tmp_path / 'out'}"])
    r = json.loads((tmp_path / "out" / "eval.json").read_text())["retrieval"]
    assert rc == 0 and "zeroshot" not in json.loads((tmp_path / "out" / "eval.json").read_text())
    assert r["rows"] == 11 and r["skipped"] == {"undecodable_image": 1}
    for way in ("i2t", "t2i"):
        assert 0.0 <= r[f"{way}_R@1"] <= r[f"{way}_R@5"] <= r[f"{way}_R@10"] <= 1.0


def test_local_dir_model_gives_the_same_result(tiny, tmp_path):
    """`model.pretrained=local-dir:DIR` (open_clip_config.json + weights, as open_clip exports) loads the same model."""
    d, root, _, ev = tiny
    model_dir = tmp_path / "hub"
    model_dir.mkdir()
    cfg = open_clip.get_model_config("clip-tiny")
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(torch.load(d / "model.pt", weights_only=True), model_dir / "open_clip_pytorch_model.bin")
    run(build_config(EvalStageConfig, {"model": {"pretrained": f"local-dir:{model_dir}"}, "out": str(tmp_path / "o"),
                                       "zeroshot": {"root": str(root), "batch_size": 4}}))
    z = json.loads((tmp_path / "o" / "eval.json").read_text())["zeroshot"]
    assert z["per_class"] == ev["zeroshot"]["per_class"] and z["top1"] == ev["zeroshot"]["top1"]
    loaded = load_model("ignored-label", f"local-dir:{model_dir}")[0].state_dict()
    saved = torch.load(d / "model.pt", weights_only=True)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
