"""`clipdense demo --quick` end to end on a real local Ray: every step's artefact exists and is well formed; the
presets in configs/demo/ load, merge under a config's `scale` keys and refuse typos."""
import json

import pytest
import yaml

from clipdense.cli import main
from clipdense.config import ConfigError, load_config
from clipdense.demo import DemoConfig, _pretrain_cfg, _sweep_cfg, preset_path, preset_scale, run
from clipdense.synth.scoring import caption_accuracy, word_recall


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

    p = preset_scale("default").model_dump(exclude_unset=True)
    trials = expand(_sweep_cfg(p, tmp_path / "sweep", tmp_path / "world", "alt.pt", "recap.pt", 0))
    assert len(trials) == 2 * 3 * (3 + 2 + 2)  # 3 seeds below fraction 0.2, else 2
    for t in trials:
        cfg = build_config(FinetuneConfig, t.finetune, t.name)
        assert cfg.backbone.frozen and cfg.head.kind == "linear" and cfg.train.schedule.total_steps == 200
        if t.task == "depth":
            assert cfg.head.depth_bins == 256
        else:  # seg's head has no bins key at all (one config class per task)
            assert not hasattr(cfg.head, "depth_bins")
        assert cfg.ray.in_process is True  # trains inside the trial actor, no Ray Train workers
        assert cfg.data.root == str(tmp_path / "world" / ("nyu" if t.task == "depth" else "ade"))
        if t.task == "depth":
            assert cfg.train.optim.lr == 3e-3
    assert {t.backbone for t in trials} == {"alt-text-clip", "recap-clip", "random-init"}


@pytest.mark.parametrize("name, n_trials", [("quick", 2 * 3 * 2), ("default", 2 * 3 * (3 + 2 + 2))])
def test_each_shipped_preset_resolves_every_steps_config(tmp_path, name, n_trials):
    """A preset file alone gives every scale key, and each step's config built from it validates."""
    from clipdense.sweep.grid import expand
    from clipdense.synth import SynthConfig

    cfg = load_config(DemoConfig, preset_path(name))
    assert cfg.scale == preset_scale(name) and cfg.quick == (name == "quick")
    p = cfg.scale.model_dump(exclude_unset=True)
    world = SynthConfig(out=str(tmp_path), **p["synth"]).resolved()
    assert world["web_images"] == cfg.scale.synth.web_images
    clip = _pretrain_cfg(p["clip_model"], "web", "recap", "synthetic", tmp_path, p["clip_steps"], p["clip_batch"], 0, 1)
    assert clip.train.schedule.total_steps == cfg.scale.clip_steps and clip.model.name == cfg.scale.clip_model
    assert len(expand(_sweep_cfg(p, tmp_path / "sweep", tmp_path / "world", "a.pt", "b.pt", 0))) == n_trials


def test_scale_keys_merge_over_the_preset(tmp_path):
    quick = preset_scale("quick")
    cfg = load_config(DemoConfig, None, ["quick=true", "scale.clip_steps=7", "scale.synth.web_images=100",
                                         "scale.small_seeds.below=0.5"])
    assert cfg.scale.clip_steps == 7 and cfg.scale.synth.web_images == 100
    assert cfg.scale.small_seeds.below == 0.5 and cfg.scale.small_seeds.seeds >= 1   # null in quick: a new section
    assert cfg.scale.model_copy(update={"clip_steps": quick.clip_steps, "small_seeds": None,
                                        "synth": quick.synth}) == quick           # nothing else moved
    edited = tmp_path / "mine.yaml"                                                # a copied, edited preset
    data = yaml.safe_load(preset_path("quick").read_text())
    data["scale"]["finetune_steps"] = 3
    del data["scale"]["recaption"]                                                 # left out: from the preset
    edited.write_text(yaml.safe_dump(data))
    mine = load_config(DemoConfig, edited)
    assert mine.scale.finetune_steps == 3 and mine.scale.recaption == quick.recaption
    assert load_config(DemoConfig).scale == preset_scale("default")
    with pytest.raises(ConfigError, match="unknown demo preset 'tiny'"):
        preset_scale("tiny")


@pytest.mark.parametrize("override, needle", [
    ("scale.clip_stpes=3", "unknown key 'scale.clip_stpes'"),
    ("scale.synth.web_imgs=3", "unknown key 'scale.synth.web_imgs'"),
    ("scale.synth.out=x", "unknown key 'scale.synth.out'"),              # the demo sets the world's directory
    ("scale.recaption.seq_len=1", "key 'scale.recaption.seq_len'"),
    ("scale.synth.preset=huge", "key 'scale.synth.preset'"),
])
def test_a_scale_typo_is_a_one_line_cli_error(capsys, override, needle):
    assert main(["demo", "--quick", override, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_quick_flag_and_quick_preset_file_resolve_alike(capsys):
    assert main(["demo", "--quick", "--print-config"]) == 0
    flag = yaml.safe_load(capsys.readouterr().out)
    assert main(["demo", "--config", str(preset_path("quick")), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == flag and flag["quick"] is True


def test_replicates_are_pretraining_runs_of_one_condition(tmp_path):
    """`--replicates 2`: the second pretraining run of each condition joins the sweep as a backbone of that
    condition, so the report's bootstrap resamples pretraining runs too."""
    p = preset_scale("quick").model_dump(exclude_unset=True)
    cfg = _sweep_cfg(p, tmp_path / "sweep", tmp_path / "world", "alt.pt", "recap.pt", 0,
                     {("alt-text-clip", 1): "alt1.pt", ("recap-clip", 1): "recap1.pt"})
    runs = {b.name: (b.condition_name, b.backbone["checkpoint"]) for b in cfg.backbones}
    assert runs == {"alt-text-clip": ("alt-text-clip", "alt.pt"), "recap-clip": ("recap-clip", "recap.pt"),
                    "alt-text-clip-r1": ("alt-text-clip", "alt1.pt"), "recap-clip-r1": ("recap-clip", "recap1.pt"),
                    "random-init": ("random-init", None)}
    assert DemoConfig(replicates=2).replicates == 2 and cfg.report.reference == "alt-text-clip"


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
