"""The portable export: a folder plain open_clip loads as `local-dir:` in a process that never imports clipdense,
with the same image features and tokens as our own model; checkpoints load with weights_only=True."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from clipdense.models.registry import create_clip, tokenizer_for
from clipdense.pretrain.task import export_model

FRESH = r'''
import json, sys
import torch, open_clip
assert not any(m.startswith("clipdense") for m in sys.modules)
d = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
model.eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    feats = model.encode_image(x)
tok = open_clip.get_tokenizer("local-dir:" + d)(["a red circle on a blue square"])
assert not any(m.startswith("clipdense") for m in sys.modules)
print(json.dumps({"feats": feats.tolist(), "tokens": tok.tolist(), "size": preprocess.transforms[0].size}))
'''


def _fresh_process(export_dir: Path, images: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", FRESH, str(export_dir), str(images)], capture_output=True,
                         text=True, timeout=300, cwd="/")  # cwd "/": nothing of this checkout importable
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_dir_export_gives_identical_features_in_a_fresh_process(tmp_path):
    for name in ("clip-tiny", "clip-demo"):  # clip-demo tokenises with a shipped 8k BPE: it travels in the folder
        torch.manual_seed(0)
        model = create_clip(name).eval()
        with torch.no_grad():
            model.logit_scale.fill_(3.0)  # a trained-looking value, not the init
        info = export_model(model, tmp_path / name, name, steps=7)
        folder = Path(info["open_clip_dir"].removeprefix("local-dir:"))
        assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()
        size = model.visual.image_size
        x = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)), generator=torch.Generator()
                        .manual_seed(1))
        torch.save(x, tmp_path / "x.pt")
        got = _fresh_process(folder, tmp_path / "x.pt")
        with torch.no_grad():
            ours = model.encode_image(x)
        assert torch.allclose(torch.tensor(got["feats"]), ours, atol=1e-5)
        assert got["tokens"] == tokenizer_for(name)(["a red circle on a blue square"]).tolist()
        cfg = json.loads((folder / "open_clip_config.json").read_text())
        assert cfg["model_cfg"]["embed_dim"] == model.text_projection.shape[1]
        assert set(cfg["preprocess_cfg"]) >= {"mean", "std"}
