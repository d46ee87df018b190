"""`data.loader: local` (pretrain/local_data.py): an in-process run reads its rows without Ray and trains exactly
what the Ray Data path trains: the same counts, held-out rows, batches and so the same weights; resume and the
decoded cache keep that; the process never imports Ray."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pretrain_files import write_world

from clipdense.config import ConfigError, build_config
from clipdense.pretrain import PretrainConfig, run

STEPS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # bad rows of every kind (a failed recaption, a key without one, an undecodable image): counted, never trained
    return write_world(tmp_path_factory.mktemp("world"), n_shards=2, per_shard=40, bad=True)


def _cfg(world, out, loader: str, **data) -> PretrainConfig:
    return build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "both"}, "ray": {"in_process": True},
        "data": {"shards": world["shards"], "recaptions": world["recaptions"], "batch_size": 16,
                 "decode_batch_size": 16, "decode_cpus": 0.5, "sample_log": True, "loader": loader, **data},
        "eval": {"holdout": 8},
        "train": {"out_dir": str(out), "optim": {"lr": 2e-3}, "schedule": {"total_steps": STEPS, "warmup_steps": 2},
                  "log_every": 4, "checkpoint": {"every_steps": 4}}})


def _steps(out) -> dict[int, list[str]]:
    recs = [json.loads(x) for x in (out / "samples" / "rank0.jsonl").read_text().splitlines()]
    return {r["step"]: r["keys"] for r in recs}  # a replayed step: the later record


def _weights(summary) -> dict:
    return torch.load(json.loads((summary["_out"] / "export" / "export.json").read_text())["model"],
                      weights_only=True)


@pytest.fixture(scope="module")
def ray_data_run(ray_local, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_data")
    return {**run(_cfg(world, out, "ray")), "_out": out}


def test_local_loader_trains_exactly_what_ray_data_trains(ray_data_run, world, tmp_path):
    """Two DataLoader workers (each makes every other batch) against Ray Data, same config."""
    local = {**run(_cfg(world, tmp_path, "local", local_workers=2)), "_out": tmp_path}
    assert local["data"] == ray_data_run["data"]
    assert local["data"]["errors"] == {"no_recaption_for_key": 1, "recaption_failed": 1, "undecodable_image": 1}
    assert local["data"]["holdout_rows"] == local["data"]["eval_rows"] == 8
    assert _steps(tmp_path) == _steps(ray_data_run["_out"]) and len(_steps(tmp_path)) == STEPS
    ours, theirs = _weights(local), _weights(ray_data_run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert local["metrics"]["eval/rows"] == ray_data_run["metrics"]["eval/rows"] == 8


def test_local_resume_with_the_decoded_cache_gives_identical_weights(ray_data_run, world, tmp_path):
    """Stopped at step 7, rerun: resumes from the step-4 checkpoint at the exact batch; the training rows are
    decoded once in memory (`data.cache`), read in the training process (`local_workers: 0`)."""
    cfg = _cfg(world, tmp_path, "local", cache=True, local_workers=0)
    cut = run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_at_step": 7})}))
    assert cut["stopped_early"] and cut["step"] == 7
    resumed = {**run(cfg), "_out": tmp_path}
    assert resumed["restored_from_steps"] == [4] and resumed["step"] == STEPS
    ours, theirs = _weights(resumed), _weights(ray_data_run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_local_run_never_imports_ray(world, tmp_path):
    """`auto` picks the local loader for an in-process run that joins no cluster; Ray is never imported."""
    cfg = _cfg(world, tmp_path / "run", "auto")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sample_log": False})})
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    code = ("import sys; from clipdense.cli import main; rc = main(['pretrain', '--config', sys.argv[1]]); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.yaml")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "NO_RAY"
    assert json.loads((tmp_path / "run" / "pretrain_summary.json").read_text())["step"] == STEPS


def test_local_loader_needs_an_in_process_run_and_a_cpu_decode(world, tmp_path):
    with pytest.raises(ConfigError, match="data.loader local .* needs ray.in_process true") as e:
        build_config(PretrainConfig, {"data": {"shards": world["shards"], "loader": "local"}})
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="data.loader local decodes in DataLoader worker processes"):
        build_config(PretrainConfig, {"data": {"shards": world["shards"], "loader": "local", "decode_on": "gpu"},
                                      "train": {"scaling": {"use_gpu": True}}, "ray": {"in_process": True}})
    assert _cfg(world, tmp_path, "auto").reads_locally()
    assert not build_config(PretrainConfig, {"data": {"shards": world["shards"]},
                                             "ray": {"in_process": True, "address": "auto"}}).reads_locally()


class _KeysOfEpoch:
    """A collate that keeps what the loader decides: the epoch it collates for and the batch's keys."""

    def __init__(self, epoch=0):
        self.epoch = epoch

    def for_epoch(self, epoch):
        return _KeysOfEpoch(epoch)

    def prepare(self):
        pass

    def __call__(self, batch):
        return self.epoch, list(batch["key"])


def test_one_loader_serves_every_epoch_and_a_resume_starts_again(tmp_path):
    """The workers are forked once per run: each epoch's batches come from the same loader, in order, the same for
    1 and 3 workers; asked for a batch mid-epoch (a resume), the loader starts again there."""
    from clipdense.pretrain.data import KEPT_COLUMNS
    from clipdense.pretrain.local_data import LocalRows

    data = build_config(PretrainConfig, {"data": {"shards": ["x.tar"], "local_workers": 3}}).data
    cached = [tuple(f"k{i:02d}" if c == "key" else None for c in KEPT_COLUMNS) for i in range(23)]  # 5 batches of 4
    rows = LocalRows(data, 8, cached=cached)
    epochs = [list(rows.train_batches(_KeysOfEpoch(), 4, e, 0, seed=0)) for e in range(3)]
    loader = rows._run
    assert [len(e) for e in epochs] == [5, 5, 5] and loader is rows._run  # one loader for the three epochs
    assert [b[0] for b in epochs[2]] == [2] * 5 and epochs[2][4][1] == ["k16", "k17", "k18", "k19"]
    one = LocalRows(data.model_copy(update={"local_workers": 1}), 8, cached=cached)
    assert [list(one.train_batches(_KeysOfEpoch(), 4, e, 0, seed=0)) for e in range(3)] == epochs
    resumed = list(rows.train_batches(_KeysOfEpoch(), 4, 1, 3, seed=0))
    assert resumed == epochs[1][3:] and rows._run is not loader
