"""`clipdense demo --quick` end to end on a real local Ray: every step's artefact exists and is well formed; the
presets in configs/demo/ load, merge under a config's `scale` keys and refuse typos."""
import csv
import json
import shutil

import pytest
import yaml

from clipdense.cli import main
from clipdense.config import ConfigError, configs_dir, load_config
from clipdense.demo import DemoConfig, preset_path, preset_scale, run, sweep_config
from clipdense.demo.stages import captioner_config, clip_config, recaption_config
from clipdense.demo.steps import Steps
from clipdense.sweep.grid import expand
from clipdense.synth import SynthConfig
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


def _checkpoints(runs: int) -> dict[tuple[str, int], str]:
    return {(c, r): f"{c}-{r}.pt" for c in ("alt-text-clip", "recap-clip", "oracle-clip") for r in range(runs)}


def test_default_sweep_has_every_condition_and_the_floors(tmp_path):
    """The default preset's sweep: 3 runs of each pretrained condition, 3 random-init seeds, the position-only
    baseline, fitted probes over 1/256 .. 1 with 5 subsets below 1; every trial validates as a finetune config."""
    p = preset_scale("default")
    cfg = sweep_config(p, tmp_path / "sweep", tmp_path / "world", _checkpoints(p.runs), 0)
    assert cfg.protocol == "fit" and cfg.report.reference == "alt-text-clip"
    groups: dict[str, list] = {}
    for b in cfg.backbones:
        groups.setdefault(b.condition_name, []).append(b)
    assert {k: len(v) for k, v in groups.items()} == {"alt-text-clip": 3, "recap-clip": 3, "oracle-clip": 3,
                                                      "random-init": 3, "position-only": 1}
    assert [b.backbone["init_seed"] for b in groups["random-init"]] == [0, 1, 2]
    assert all(b.backbone["checkpoint"] is None for b in groups["random-init"])
    trials = expand(cfg)
    assert min(t.fraction for t in trials) <= 1 / 64
    assert len(trials) == 2 * 13 * (4 * 5 + 1)
    for t in trials[:: 13]:
        ft = t.finetune
        assert ft.backbone.frozen and ft.head.kind == "linear" and ft.ray.in_process is True
        assert ft.data.root == str(tmp_path / "world" / ("nyu" if t.task == "depth" else "ade"))
        assert (ft.head.depth_bins == 256) if t.task == "depth" else not hasattr(ft.head, "depth_bins")


@pytest.mark.parametrize("name", ["quick", "default"])
def test_each_shipped_preset_resolves_every_steps_config(tmp_path, name):
    """A preset file alone gives every scale key, and each step's config built from the stage templates in
    configs/demo/stages/ validates (a renamed stage key fails here, not mid-run)."""
    cfg = load_config(DemoConfig, preset_path(name))
    assert cfg.scale == preset_scale(name) and cfg.quick == (name == "quick")
    p = cfg.scale
    world = SynthConfig(out=str(tmp_path), **p.synth.model_dump(exclude_unset=True)).resolved()
    assert world["web_images"] == p.synth.web_images
    coca = captioner_config(p, tmp_path / "curated", tmp_path / "captioner", 0, 1)
    assert coca.loss.kind == "coca" and coca.train.schedule.total_steps == p.captioner_steps
    assert coca.train.optim.lr == p.captioner_lr and coca.model.name == p.coca_model
    for condition, policy in (("alt-text-clip", "real"), ("recap-clip", "synthetic"), ("oracle-clip", "synthetic")):
        clip = clip_config(p, condition, tmp_path / "web", tmp_path / "captions", tmp_path / "run", 3, 1)
        assert clip.train.schedule.total_steps == p.clip_steps and clip.model.name == p.clip_model
        assert clip.captions.policy == policy and clip.train.seed == 3
    rc = recaption_config(p, tmp_path / "web", tmp_path / "recap", tmp_path / "model.pt", 0)
    assert rc.engine.num_captions == p.recaption.num_captions and rc.engine.kind == "coca"
    assert expand(sweep_config(p, tmp_path / "sweep", tmp_path / "world", _checkpoints(p.runs), 0))


def test_a_stage_template_with_a_renamed_key_fails_at_load(tmp_path, monkeypatch):
    bad = tmp_path / "demo" / "stages"
    bad.mkdir(parents=True)
    for f in (configs_dir() / "demo" / "stages").glob("*.yaml"):
        (bad / f.name).write_text(f.read_text().replace("grad_clip", "grad_clipping"))
    monkeypatch.setattr("clipdense.demo.stages.configs_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="grad_clipping"):
        clip_config(preset_scale("quick"), "recap-clip", tmp_path, tmp_path, tmp_path, 0, 1)


def test_scale_keys_merge_over_the_preset(tmp_path):
    quick = preset_scale("quick")
    cfg = load_config(DemoConfig, None, ["quick=true", "scale.clip_steps=7", "scale.synth.web_images=100",
                                         "scale.small_seeds.below=0.5"])
    assert cfg.scale.clip_steps == 7 and cfg.scale.synth.web_images == 100
    assert cfg.scale.small_seeds.below == 0.5 and cfg.scale.small_seeds.seeds == quick.small_seeds.seeds
    assert cfg.scale.model_copy(update={"clip_steps": quick.clip_steps, "small_seeds": quick.small_seeds,
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


def test_runs_are_pretraining_runs_of_one_condition(tmp_path):
    """`--replicates 2` (else the preset's `runs`): run r of each condition is seeded seed+r and joins the sweep as a
    backbone of its condition, so the report pairs run r of every condition and pools run variance."""
    assert DemoConfig(quick=True, replicates=2).runs == 2 and DemoConfig(quick=True).runs == 1
    p = preset_scale("quick").model_copy(update={"runs": 2})
    cfg = sweep_config(p, tmp_path / "sweep", tmp_path / "world", _checkpoints(2), 5)
    runs = {b.name: (b.condition_name, b.backbone.get("checkpoint")) for b in cfg.backbones}
    assert runs["alt-text-clip-r1"] == ("alt-text-clip", "alt-text-clip-1.pt")
    assert runs["oracle-clip"] == ("oracle-clip", "oracle-clip-0.pt")
    assert runs["random-init"] == ("random-init", None) and runs["position-only"] == ("position-only", None)


def test_step_hashes_chain_and_ignore_the_output_folder(tmp_path):
    def hashes(out, **changed):
        steps = Steps(out, False, 3)
        configs = {"a": 1, "b": str(out / "x"), "c": 3, **changed}
        return [steps.step(n, k, k, v).hash for n, (k, v) in enumerate(configs.items(), 1)]

    base = hashes(tmp_path / "one")
    assert hashes(tmp_path / "two") == base                       # `out` is not part of any hash
    changed = hashes(tmp_path / "one", b="other")
    assert changed[0] == base[0] and changed[1] != base[1] and changed[2] != base[2]   # reruns from b on


SMALL = ["scale.synth.web_images=128", "scale.synth.shard_size=64", "scale.synth.ade_train=64",
         "scale.synth.nyu_train=64", "scale.synth.ade_val=16", "scale.synth.nyu_test=16",
         "scale.captioner_steps=4", "scale.clip_steps=4", "scale.clip_batch=32", "scale.captioner_batch=32",
         "scale.recaption.seq_len=12", "scale.recaption.num_captions=1", "scale.fractions=[0.015625,0.25,1.0]",
         "scale.small_seeds.seeds=2"]


def _figures(out) -> dict:
    rows = list(csv.DictReader((out / "sweep" / "report.csv").open()))
    figures = {}
    for r in rows:
        for k, v in r.items():
            try:
                figures[tuple(r.get(c) for c in ("task", "backbone", "fraction")) + (k,)] = float(v)
            except (TypeError, ValueError):
                pass
    return figures


@pytest.mark.slow
def test_demo_smaller_than_quick_writes_every_artefact_and_reruns_the_same(ray_local, tmp_path):
    """One demo below quick size: every artefact; a rerun with the same seed from the same recaptions reproduces
    every figure of the report within 1e-3; a changed probe key reruns only the steps from the probe on. (That
    captions are a pure function of seed and key is the recaption tests' part.)"""
    out = tmp_path / "demo"
    cfg = load_config(DemoConfig, None, ["quick=true", f"out={out}", *SMALL])
    run(cfg)
    for d in ("web", "curated", "ade", "nyu"):
        assert (out / "world" / d).is_dir()
    assert len(sorted((out / "recaptioned").glob("*.parquet"))) == len(sorted((out / "world" / "web").glob("*.tar")))
    assert len(sorted((out / "oracle").glob("*.parquet"))) == 2
    for name in ("alt-text-clip", "recap-clip", "oracle-clip"):
        assert (out / "pretrain" / name / "export" / "model.pt").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["conditions"]) == {"alt-text-clip", "recap-clip", "oracle-clip", "random-init"}
    assert summary["provenance"]["code_version"]["commit"] and summary["provenance"]["config_hash"]
    assert all(summary["steps"][s]["seconds"] > 0 for s in ("world", "captioner", "recaption", "pretrain", "probe"))
    assert [k for k in summary["caption_quality"] if "atypical" in k]
    factors = json.loads((out / "sweep" / "factors.json").read_text())
    assert factors and {r["backbone"] for r in csv.DictReader((out / "sweep" / "report.csv").open())} >= {
        "alt-text-clip", "recap-clip", "oracle-clip", "random-init", "position-only"}

    # the rerun: steps 4-6 again from the same world, captioner and recaptions
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in ("pretrain", "sweep"):
        shutil.rmtree(again / name)
    for marker in [*again.glob(".done-[4-6]"), *again.glob(".started-[4-6]")]:
        marker.unlink()
    run(load_config(DemoConfig, None, ["quick=true", f"out={again}", *SMALL]))
    first, second = _figures(out), _figures(again)
    assert first.keys() == second.keys() and len(first) > 20
    moved = {k: (first[k], second[k]) for k in first if abs(first[k] - second[k]) > 1e-3}
    assert not moved

    run(load_config(DemoConfig, None, ["quick=true", f"out={out}", *SMALL, "scale.small_seeds.seeds=3"]))
    ran = {k: v["ran"] for k, v in json.loads((out / "demo_summary.json").read_text())["steps"].items()}
    assert ran == {"world": False, "captioner": False, "recaption": False, "pretrain": False, "probe": True,
                   "report": True}
