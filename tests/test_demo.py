"""`clipdense demo --quick` end to end on a real local Ray: every step's artefact exists and is well formed."""
import json

import pytest

from clipdense.demo import PRESETS, DemoConfig, _sweep_cfg, caption_accuracy, run, word_recall


def test_caption_accuracy_counts_colour_and_shape():
    scene = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]}
    assert caption_accuracy("A small red circle at the left.", scene) == 0.5
    assert caption_accuracy("a blue circle and a red star", scene) == 0.0
    assert caption_accuracy("", scene) == 0.0


def test_word_recall_scores_colour_and_shape_words_apart():
    scene = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]}
    assert word_recall("Red CIRCLES beside a green star", scene) == {"colour": 0.5, "shape": 1.0}
    assert word_recall("a blue circle and a red star", scene) == {"colour": 1.0, "shape": 1.0}  # unbound words
    assert word_recall("IMG_2041.jpg", scene) == {"colour": 0.0, "shape": 0.0}


def test_default_sweep_probes_frozen_trunks_with_the_binned_depth_head(tmp_path):
    """Every default-preset trial validates as a finetune config: frozen trunk + linear head; depth with DINOv2's 256
    bins at lr 3e-3, seg with no bins; the three towers at every fraction."""
    from clipdense.config import build_config
    from clipdense.dense.config import FinetuneConfig
    from clipdense.sweep.grid import expand

    p = PRESETS["default"]
    trials = expand(_sweep_cfg(p, tmp_path / "sweep", tmp_path / "world", "alt.pt", "recap.pt", 0))
    assert len(trials) == 2 * 3 * (3 + 2 + 2)  # 3 seeds below fraction 0.2, else 2
    for t in trials:
        cfg = build_config(FinetuneConfig, t.finetune, t.name)
        assert cfg.backbone.frozen and cfg.head.kind == "linear" and cfg.train.schedule.total_steps == 200
        assert cfg.head.depth_bins == (256 if t.task == "depth" else 0)
        assert cfg.ray.in_process is True  # trains inside the trial actor, no Ray Train workers
        assert cfg.data.root == str(tmp_path / "world" / ("nyu" if t.task == "depth" else "ade"))
        if t.task == "depth":
            assert cfg.train.optim.lr == 3e-3
    assert {t.backbone for t in trials} == {"alt-text-clip", "recap-clip", "random-init"}


@pytest.mark.slow
def test_demo_quick_produces_every_artefact(ray_local, tmp_path):
    out = tmp_path / "demo"
    result = run(DemoConfig(out=str(out), quick=True))
    for d in ("web", "curated", "ade", "nyu", "coco"):
        assert (out / "world" / d).is_dir()
    assert (out / "captioner" / "export" / "model.pt").is_file()
    recaps = sorted((out / "recaptioned").glob("*.parquet"))
    assert len(recaps) == len(sorted((out / "world" / "web").glob("*.tar")))
    for name in ("alt-text-clip", "recap-clip"):
        assert (out / "pretrain" / name / "export" / "model.pt").is_file()
    trials = [json.loads(p.read_text()) for p in (out / "sweep").rglob("metrics.json")]
    assert len(trials) == 12  # 2 tasks x 3 backbones (alt-text, recap, random-init) x 2 fractions x 1 seed
    assert all(t["backbone"]["frozen"] and t["config"]["head"]["kind"] == "linear" for t in trials)  # the probe
    assert sum(t["backbone"]["checkpoint"] is None for t in trials) == 4  # random-init: no checkpoint
    for task in ("seg", "depth"):
        assert (out / "sweep" / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    factors = json.loads((out / "sweep" / "factors.json").read_text())
    assert factors and (out / "sweep" / "report.md").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())
    quality = summary["caption_quality"]
    assert quality["images_scored"] > 0 and result["seconds"] > 0
    assert all(0.0 <= quality[f"{who}_{what}"] <= 1.0 for who in ("alt_text", "synthetic")
               for what in ("accuracy", "colour_recall", "shape_recall"))
    assert all((out / f".done-{i}").is_file() for i in range(1, 6))
