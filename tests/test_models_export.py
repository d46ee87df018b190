"""The portable export: a folder plain open_clip loads as `local-dir:` in a process that never imports clipdense,
with the same image features and tokens as our own model, in place and after the folder is moved; checkpoints load
with weights_only=True."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from clipdense.models.export import export_model
from clipdense.models.registry import create_clip, tokenizer_for

FRESH = r"""
import json, shutil, sys
from pathlib import Path
import torch, open_clip
assert not any(m.startswith("clipdense") for m in sys.modules)
text = ["a red circle on a blue square"]


def load(d, x, bpe_path):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
    with torch.no_grad():
        got = {"feats": model.eval().encode_image(x).tolist(), "size": preprocess.transforms[0].size}
    try:
        got["tokens"] = open_clip.get_tokenizer("local-dir:" + d)(text).tolist()
    except FileNotFoundError as e:  # a moved folder whose config names the BPE file where it was written
        got["tokens_error"] = str(e)
    if bpe_path:  # the README's workaround for a moved folder: name the BPE file inside it
        got["tokens_bpe_path"] = open_clip.get_tokenizer("local-dir:" + d, bpe_path=bpe_path)(text).tolist()
    return got


out = []
for job in json.loads(sys.argv[1]):  # each export: loaded where it was written, then moved elsewhere and loaded
    x = torch.load(job["images"], weights_only=True)
    here = load(job["dir"], x, "")
    shutil.move(job["dir"], job["moved"])  # as a copy taken to another machine, or an hf-hub: download, would be
    bpe = job["bpe_name"] and str(Path(job["moved"]) / job["bpe_name"])
    out.append({"here": here, "moved": load(job["moved"], x, bpe)})
assert not any(m.startswith("clipdense") for m in sys.modules)
print(json.dumps(out))
"""


def _fresh_process(jobs: list[dict]) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, cwd="/")  # cwd "/": nothing of this checkout importable
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_dir_export_gives_identical_features_in_a_fresh_process(tmp_path):
    names = ("clip-tiny", "clip-demo")  # clip-demo tokenises with a shipped 8k BPE: it travels in the folder
    jobs, ours = [], {}
    for name in names:
        torch.manual_seed(0)
        model = create_clip(name).eval()
        with torch.no_grad():
            model.logit_scale.fill_(3.0)  # a trained-looking value, not the init
        info = export_model(model, tmp_path / name, name, steps=7)
        folder = Path(info["open_clip_dir"].removeprefix("local-dir:"))
        assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()
        cfg = json.loads((folder / "open_clip_config.json").read_text())
        assert cfg["model_cfg"]["embed_dim"] == model.text_projection.shape[1]
        assert set(cfg["preprocess_cfg"]) >= {"mean", "std"}
        bpe = (cfg["model_cfg"]["text_cfg"].get("tokenizer_kwargs") or {}).get("bpe_path")
        assert (bpe is not None) == (name == "clip-demo")
        assert bpe is None or (folder / Path(bpe).name).is_file()  # the BPE file is inside the folder
        size = model.visual.image_size
        x = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)), generator=torch.Generator()
                        .manual_seed(1))
        torch.save(x, tmp_path / f"{name}-x.pt")
        with torch.no_grad():
            ours[name] = (model.encode_image(x), tokenizer_for(name)(["a red circle on a blue square"]).tolist(), bpe)
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        jobs.append({"dir": str(folder), "images": str(tmp_path / f"{name}-x.pt"),
                     "moved": str(tmp_path / "elsewhere" / name), "bpe_name": Path(bpe).name if bpe else ""})
    for name, got in zip(names, _fresh_process(jobs)):
        feats, tokens, bpe = ours[name]
        assert not (tmp_path / name / "open_clip").exists()  # really moved: nothing left where it was written
        assert torch.allclose(torch.tensor(got["here"]["feats"]), feats, atol=1e-5)
        assert torch.allclose(torch.tensor(got["moved"]["feats"]), feats, atol=1e-5)
        assert got["here"]["tokens"] == tokens
        if bpe:
            assert got["moved"]["tokens_bpe_path"] == tokens  # the workaround gives the same tokens
            # open_clip 3.3 opens bpe_path as written, not against the folder: after a move, plain get_tokenizer
            # fails loudly naming the old file, never tokenises differently
            assert got["moved"].get("tokens") == tokens or Path(bpe).name in got["moved"]["tokens_error"]
        else:
            assert got["moved"]["tokens"] == tokens  # open_clip's own BPE: nothing to carry
