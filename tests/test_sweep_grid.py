"""Grid expansion of a SweepConfig: counts, log-spaced fractions, deterministic names, typed finetune configs
(validated once, coordinates set as typed edits), errors."""
import pytest
import yaml

from clipdense.config import ConfigError, load_config
from clipdense.sweep.config import SweepConfig
from clipdense.sweep.grid import default_fractions, expand, flat_metrics, grid_hash, seeds_for


@pytest.fixture
def base_yaml(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump({"task": "seg", "backbone": {"name": "clip-tiny", "drop_path": 0.1},
                                    "data": {"root": "data/ade", "batch_size": 4},
                                    "train": {"optim": {"lr": 1e-4}, "schedule": {"total_steps": 10}}}))
    return path


def _cfg(tmp_path, base_yaml, **extra):
    data = {"out": str(tmp_path / "out"),
            "backbones": [{"name": "alt-text-clip", "backbone": {"checkpoint": "a.pt"}},
                          {"name": "recap-clip", "backbone": {"checkpoint": "b.pt"},
                           "overrides": {"train.optim.lr": 3e-4}}],
            "tasks": [{"name": "seg", "config": str(base_yaml), "overrides": {"train.schedule.total_steps": 5}},
                      {"name": "depth", "config": str(base_yaml), "overrides": {"task": "depth"}}]}
    data.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(SweepConfig, path)


def test_default_fractions_are_powers_of_two_from_1_64():
    fr = default_fractions(1 / 64)
    assert fr == [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert all(b == 2 * a for a, b in zip(fr, fr[1:]))                 # nested, log-spaced
    assert default_fractions(0.3) == [0.5, 1.0]


def test_counts_with_extra_seeds_at_small_fractions(tmp_path, base_yaml):
    cfg = _cfg(tmp_path, base_yaml)
    trials = expand(cfg)
    # per (task, backbone): 4 fractions < 1/4 with 5 seeds + 3 fractions with 3 seeds
    assert seeds_for(cfg, 1 / 8) == [0, 1, 2, 3, 4] and seeds_for(cfg, 0.25) == [0, 1, 2]
    assert len(trials) == 2 * 2 * (4 * 5 + 3 * 3)
    names = [t.name for t in trials]
    assert len(set(names)) == len(names)
    assert "seg/recap-clip/f0.0625/s1" in names
    assert "depth/alt-text-clip/f1/s2" in names
    assert "depth/alt-text-clip/f1/s3" not in names


def test_trial_configs_are_typed_and_carry_coordinates_and_overrides(tmp_path, base_yaml):
    cfg = _cfg(tmp_path, base_yaml, fractions=[0.5, 0.125], seeds=1, small_fraction_seeds=None)
    trials = expand(cfg)
    assert [t.fraction for t in trials[:2]] == [0.125, 0.5]             # ascending
    assert len(trials) == 2 * 2 * 2
    t = next(t for t in trials if t.name == "seg/recap-clip/f0.125/s0")
    ft = t.finetune
    assert type(ft).__name__ == "SegFinetune"
    bb = ft.backbone      # merged, not replaced
    assert (bb.name, bb.drop_path, bb.checkpoint) == ("clip-tiny", 0.1, "b.pt")
    assert ft.train.optim.lr == 3e-4 and ft.train.schedule.total_steps == 5
    assert ft.data.fraction == 0.125 and ft.data.seed == 0 and ft.train.seed == 0
    assert ft.out_dir == str(tmp_path / "out" / "trials" / t.name)
    assert t.metric == "mIoU" and t.mode == "max"
    d = next(t for t in trials if t.task == "depth")
    assert d.finetune.task == "depth" and d.metric == "rmse" and d.mode == "min"
    assert d.finetune.train.schedule.total_steps == 10        # seg's override did not leak
    s3 = next(t for t in trials if t.name == "depth/alt-text-clip/f0.5/s0")
    assert s3.finetune.backbone.checkpoint == "a.pt" and s3.finetune.train.optim.lr == 1e-4
    assert s3.finetune.data.fraction == 0.5 and t.finetune.data.fraction == 0.125   # copies, not one shared config


def test_grid_hash_changes_with_the_grid(tmp_path, base_yaml):
    a = _cfg(tmp_path, base_yaml, fractions=[0.5, 1.0])
    b = _cfg(tmp_path, base_yaml, fractions=[0.25, 0.5, 1.0])
    assert grid_hash(expand(a), a) == grid_hash(expand(a), a)
    assert grid_hash(expand(a), a) != grid_hash(expand(b), b)


@pytest.mark.parametrize("extra, needle", [
    ({"backbones": [{"name": "a/b"}]}, "backbone name 'a/b'"),
    ({"tasks": [{"name": "..", "config": "x.yaml", "metric": "m", "mode": "max"}]}, "task name '..'"),
    ({"name": "-sweep"}, "sweep name '-sweep'"),
    ({"backbones": [{"name": "x"}, {"name": "x"}]}, "duplicate backbone"),
    ({"tasks": [{"name": "cls", "config": "x.yaml"}]}, "give `metric` and `mode`"),
    ({"fractions": [0.5, 1.5]}, "fractions"),
    ({"report": {"reference": "nope"}}, "report.reference"),
    ({"search_space": {"optim.lr": {"loguniform": [1e-4, 1e-3], "choice": [1]}}}, "exactly one"),
])
def test_config_errors_are_one_line(tmp_path, base_yaml, extra, needle):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, base_yaml, **extra)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "sweep.yaml" in str(e.value)


def test_missing_finetune_config_names_the_file(tmp_path, base_yaml):
    cfg = _cfg(tmp_path, base_yaml, tasks=[{"name": "seg", "config": "configs/finetune/nope.yaml"}])
    with pytest.raises(ConfigError, match="nope.yaml"):
        expand(cfg)


@pytest.mark.parametrize("name", ["data-efficiency", "data-efficiency-tiny", "hparam-asha"])
def test_shipped_sweep_configs_expand_to_valid_finetune_configs(name, tmp_path):
    from clipdense.config import configs_dir
    from clipdense.sweep.tune import _spec, finetune_config

    cfg = load_config(SweepConfig, configs_dir() / "sweep" / f"{name}.yaml", [f"out={tmp_path}"])
    trials = expand(cfg)
    expected = {"data-efficiency": 3 * 3 * (4 * 5 + 3 * 3), "data-efficiency-tiny": 4, "hparam-asha": 1}[name]
    assert len(trials) == expected
    for t in trials[:: max(1, len(trials) // 10)]:
        ft = finetune_config(_spec(cfg, t, tmp_path), {}, tmp_path / "trials" / t.name)
        assert ft.task == t.task and ft.data.fraction == t.fraction and ft.train.seed == t.seed == ft.data.seed
        assert ft.out_dir == str(tmp_path / "trials" / t.name)
    if cfg.search_space:
        ft = finetune_config(_spec(cfg, trials[0], tmp_path), {"train.optim.lr": 3e-4}, tmp_path)
        assert ft.train.optim.lr == 3e-4 and trials[0].finetune.train.optim.lr != 3e-4   # the grid's stays
        with pytest.raises(ConfigError, match=r"train\.optim\.lr") as e:       # a sampled value is validated
            finetune_config(_spec(cfg, trials[0], tmp_path), {"train.optim.lr": "fast"}, tmp_path)
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match="unknown key 'train.optim.lrr'"):
            finetune_config(_spec(cfg, trials[0], tmp_path), {"train.optim.lrr": 1e-3}, tmp_path)


def test_a_bad_value_in_a_task_config_names_the_file_and_backbone(tmp_path, base_yaml):
    cfg = _cfg(tmp_path, base_yaml, tasks=[{"name": "seg", "config": str(base_yaml),
                                            "overrides": {"data.batch_size": "many"}}])
    with pytest.raises(ConfigError, match=r"seg.yaml \(task seg, backbone alt-text-clip\).*data.batch_size") as e:
        expand(cfg)                                                      # validated on the driver, before Ray
    assert "\n" not in str(e.value)


def test_a_task_override_into_a_scalar_is_a_one_line_error(tmp_path, base_yaml):
    cfg = _cfg(tmp_path, base_yaml, tasks=[{"name": "seg", "config": str(base_yaml),
                                            "overrides": {"task.kind": "x"}}])
    with pytest.raises(ConfigError, match="'task' is not a section"):
        expand(cfg)


def test_flat_metrics_joins_nested_keys_and_keeps_finite_numbers_only():
    doc = {"task": "seg", "metrics": {"mIoU": 0.5, "per_class": {"circle": 0.25}, "nan": float("nan"),
                                      "ok": True, "names": ["a"]},
           "train": {"steps": 10}, "config": {"lr": 1.0}, "backbone": {"params": 5}}
    assert flat_metrics(doc) == {"metrics/mIoU": 0.5, "metrics/per_class/circle": 0.25, "train/steps": 10.0}
    assert flat_metrics(doc["metrics"]) == {"mIoU": 0.5, "per_class/circle": 0.25}


def test_schedule_by_epochs_scales_steps_and_is_recorded(tmp_path, base_yaml):
    by_iter = {t.name: t for t in expand(_cfg(tmp_path, base_yaml, fractions=[0.25, 1.0], seeds=1))}
    by_epoch = {t.name: t for t in expand(_cfg(tmp_path, base_yaml, fractions=[0.25, 1.0], seeds=1,
                                               schedule_by="epochs"))}
    steps = lambda t: t.finetune.train.schedule.total_steps
    assert steps(by_iter["depth/recap-clip/f0.25/s0"]) == steps(by_iter["depth/recap-clip/f1/s0"]) == 10
    assert steps(by_epoch["depth/recap-clip/f0.25/s0"]) == 2 and steps(by_epoch["depth/recap-clip/f1/s0"]) == 10
    coords = by_epoch["depth/recap-clip/f0.25/s0"].coordinates()
    assert (coords["schedule_by"], coords["total_steps"], coords["condition"]) == ("epochs", 2, "recap-clip")
    grouped = expand(_cfg(tmp_path, base_yaml, seeds=1, fractions=[1.0], report={"reference": "alt"},
                          backbones=[{"name": "alt-s0", "condition": "alt"}, {"name": "alt-s1", "condition": "alt"}]))
    assert {t.coordinates()["condition"] for t in grouped} == {"alt"}


def test_backbone_overrides_apply_to_the_tasks_that_have_the_key(tmp_path, base_yaml):
    probe = {"name": "probe", "overrides": {"head.depth_bins": 256, "head.aux_weight": 0.0, "train.optim.lr": 3e-3,
                                            "backbone.model_kwargs.img_size": 64}}
    trials = expand(_cfg(tmp_path, base_yaml, seeds=1, fractions=[1.0], small_fraction_seeds=None, backbones=[probe]))
    seg = next(t for t in trials if t.task == "seg").finetune
    depth = next(t for t in trials if t.task == "depth").finetune
    assert seg.head.aux_weight == 0.0 and depth.head.depth_bins == 256                 # each only its own key
    assert not hasattr(seg.head, "depth_bins") and not hasattr(depth.head, "aux_weight")
    assert seg.train.optim.lr == depth.train.optim.lr == 3e-3                            # a shared key: both
    assert seg.backbone.model_kwargs == {"img_size": 64}                                 # inside a free-form dict
    bad = {"name": "probe", "overrides": {"head.depth_bin": 256}}
    with pytest.raises(ConfigError, match="'head.depth_bin' is a key of no task") as e:
        _cfg(tmp_path, base_yaml, seeds=1, fractions=[1.0], backbones=[bad])
    assert "\n" not in str(e.value) and "sweep.yaml" in str(e.value)
