"""A trained model's export: `export_model` writes `model.pt` (open_clip's state dict, loadable once our model configs
are registered), `visual.pt` (the image tower), `export.json`, and `open_clip/`, a folder plain open_clip loads:
`open_clip.create_model_and_transforms("local-dir:<dir>")`.

The folder is open_clip's own Hugging Face layout (what `push_to_hf_hub` uploads and `hf-hub:` reads):
`open_clip_config.json` (`model_cfg` + `preprocess_cfg`, written by open_clip's `save_config_for_hf`) and
`open_clip_model.safetensors`. A model whose tokenizer uses a shipped BPE file (the demo models) gets that file
copied into the folder. open_clip (3.3) cannot find it there by itself: `get_tokenizer("local-dir:<dir>")` resolves
only an HF tokenizer (`hf_tokenizer_name`, which needs `transformers`) against the folder and hands `tokenizer_kwargs`
to SimpleTokenizer unchanged, which opens `bpe_path` as written (a relative path against the working directory);
`hf-hub:` downloads no BPE at all. So the config names the copy by its absolute path: after moving the folder (or
pushing it), pass `bpe_path=<new dir>/<file>` (or `hf_hub_download(<repo>, <file>)`) to `open_clip.get_tokenizer`.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import open_clip
import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from clipdense.models.registry import register_model_configs

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def export_open_clip_dir(model, name: str, out: str | Path) -> Path:
    """Write `model` (an open_clip model built from config `name`) as an open_clip local-dir folder at `out`."""
    register_model_configs()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}: cannot export its config")
    tok = (model_cfg.get("text_cfg") or {}).get("tokenizer_kwargs") or {}
    if "bpe_path" in tok:
        src = Path(tok["bpe_path"])
        dst = out / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        tok["bpe_path"] = str(dst.resolve())
    # clone: safetensors refuses tensors that share memory (tied weights)
    tensors = {k: v.detach().float().cpu().clone().contiguous() if v.is_floating_point() else v.detach().cpu().clone()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    save_config_for_hf(model, out / CONFIG_FILE, model_cfg)
    return out


def parameter_counts(model) -> dict[str, int]:
    """{"params": the model's, "visual_params": its image tower's}."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"params": count(model), "visual_params": count(model.visual)}


def export_model(model, out: Path, name: str, steps: int | None = None) -> dict:
    """`model.pt` (open_clip.create_model(name, pretrained=...) loads it once our model configs are registered),
    `visual.pt` (image tower), `open_clip/` (plain open_clip loads it as `local-dir:`), export.json."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save(sd, out / "model.pt")
    torch.save({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, out / "visual.pt")
    portable = export_open_clip_dir(model, name, out / "open_clip")  # loads with plain open_clip, no clipdense
    info = {"name": name, "model": str(out / "model.pt"), "visual": str(out / "visual.pt"),
            "open_clip_dir": f"local-dir:{portable}", **parameter_counts(model), "steps": steps}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return info
