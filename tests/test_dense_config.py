"""FinetuneConfig as a discriminated union on `task`: each task takes only its own keys (a key of another task is a
one-line error naming the tasks that have it), every shipped YAML is valid, and the task table is the one place
that knows each task's module and default metric."""
from __future__ import annotations

import pickle

import pytest

from clipdense.cli import main as cli_main
from clipdense.config import ConfigError, configs_dir, load_config
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.config import FinetuneConfig, has_key, tasks_with_key
from clipdense.dense.tasks import TASKS
from clipdense.dense.tasks.depth.config import DepthFinetune
from clipdense.dense.tasks.det.config import DetFinetune
from clipdense.dense.tasks.seg.config import SegFinetune


@pytest.mark.parametrize("overrides, needle", [
    (["task=seg", "head.depth_bins=256"], "key 'head.depth_bins': not supported for task seg (a key of task depth)"),
    (["task=depth", "head.aux_weight=0"], "key 'head.aux_weight': not supported for task depth (a key of task seg)"),
    (["task=det", "data.crop_size=[64,64]"], "not supported for task det (a key of task seg, depth)"),
    (["task=seg", "data.lsj_size=1024"], "key 'data.lsj_size': not supported for task seg (a key of task det)"),
    (["task=seg", "head.nope=1"], "unknown key 'head.nope'"),
    (["task=cls"], "key 'task': must be one of seg | depth | det"),
])
def test_a_key_of_another_task_is_a_one_line_error(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_names_the_key_in_one_line(tmp_path, capsys):
    code = cli_main(["finetune", "task=seg", "head.depth_bins=4", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "head.depth_bins" in err[0] and "task seg" in err[0]


def test_the_task_picks_the_class():
    seg = FinetuneConfig.model_validate({})
    assert type(seg) is SegFinetune and isinstance(seg, FinetuneBase) and seg == SegFinetune()
    depth = load_config(FinetuneConfig, None, ["task=depth", "head.depth_bins=16"])
    assert type(depth) is DepthFinetune and depth.head.depth_bins == 16 and depth.data.root == "data/nyu"
    assert type(FinetuneConfig.model_validate({"task": "det"})) is DetFinetune
    assert FinetuneConfig.model_validate(depth) is depth  # an already built task config passes as it is
    assert type(pickle.loads(pickle.dumps(depth))) is DepthFinetune  # Ray ships configs pickled
    copy = depth.model_copy(update={"out_dir": "elsewhere"})
    assert type(copy) is DepthFinetune and copy.out_dir == "elsewhere"
    assert FinetuneConfig.model_validate(depth.model_dump(mode="json")) == depth


def test_every_shipped_finetune_yaml_is_valid_for_its_task():
    for path in sorted((configs_dir() / "finetune").glob("*.yaml")):
        cfg = load_config(FinetuneConfig, path)
        assert type(cfg) is FinetuneConfig.TASKS[cfg.task], path.name


def test_key_lookup_and_the_task_table():
    assert has_key(DepthFinetune, "head.depth_bins") and not has_key(SegFinetune, "head.depth_bins")
    assert has_key(SegFinetune, "backbone.model_kwargs.img_size")  # free-form dict: any key below it
    assert not has_key(SegFinetune, "train.optim.lr.x")  # below a number
    assert tasks_with_key("train.optim.lr") == ["seg", "depth", "det"] and tasks_with_key("data.nyu_crop") == ["depth"]
    from clipdense.sweep.config import TASK_METRICS

    assert set(TASKS) == set(FinetuneConfig.TASKS) == set(TASK_METRICS)
    assert TASK_METRICS == {"seg": ("mIoU", "max"), "depth": ("rmse", "min"), "det": ("map", "max")}
    assert all(TASKS[name].config is cls for name, cls in FinetuneConfig.TASKS.items())
