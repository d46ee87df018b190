"""The sweep end to end on the real finetune (Ray Tune -> Ray Train) over the synthetic world: a trial fails,
the sweep is rerun, finished trials are not rerun and every trial ends complete; then an ASHA hyperparameter
sweep whose finetunes report intermediate eval metrics to Tune."""
import json
import re

import pytest
import yaml
from PIL import Image

from clipdense.cli import main as cli_main
from clipdense.config import build_config, configs_dir, read_yaml
from clipdense.sweep import SweepConfig, run

pytestmark = pytest.mark.slow


def _tiny(ade_root, out, **extra) -> dict:
    data = read_yaml(configs_dir() / "sweep" / "data-efficiency-tiny.yaml")
    data["out"] = str(out)
    data["verbose"] = 0
    data["tasks"][0]["overrides"]["data.root"] = str(ade_root)
    data.update(extra)
    return data


def test_failed_trial_then_resume_without_rerunning_finished_ones(ray_local, ade_root, tmp_path, capsys):
    ckpt = tmp_path / "recap" / "export" / "model.pt"          # the recaptioned CLIP is not exported yet
    data = _tiny(ade_root, tmp_path / "sweep")
    data["backbones"][1]["backbone"]["checkpoint"] = str(ckpt)
    data["tasks"][0]["overrides"]["ray.in_process"] = True        # in the trial actor (the ASHA test uses Ray Train)
    first = run(build_config(SweepConfig, data))

    trials = tmp_path / "sweep" / "trials"
    alt = sorted(trials.glob("seg/alt-text-clip/*/s0/metrics.json"))
    assert [p.parent.parent.name for p in alt] == ["f0.5", "f1"]
    assert sorted(f.split(":")[0] for f in first["failed"]) == ["seg/recap-clip/f0.5/s0", "seg/recap-clip/f1/s0"]
    assert all("model.pt" in f for f in first["failed"])           # the one-line cause names the missing file
    assert not list(trials.glob("seg/recap-clip/*/s0/metrics.json"))
    assert first["report"]["trials"] == 2                          # the report ran on what finished
    mtimes = {p: p.stat().st_mtime_ns for p in alt}

    from clipdense.models.export import export_model
    from clipdense.models.registry import create_clip
    export_model(create_clip("clip-tiny"), ckpt.parent, "clip-tiny")
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert cli_main(["sweep", "--config", str(cfg_path)]) == 0    # same grid: Tuner.restore reruns the errored
    printed = capsys.readouterr().out
    assert '"restored"' in printed and '"failed": []' in printed

    assert {p: p.stat().st_mtime_ns for p in alt} == mtimes       # finished trials were not rerun
    for f in ("f0.5", "f1"):
        tdir = trials / "seg" / "recap-clip" / f / "s0"
        record = json.loads((tdir / "metrics.json").read_text())
        assert record["backbone"]["checkpoint"] == str(ckpt)
        assert record["data"]["fraction"] == float(f[1:])
        assert 0.0 <= record["metrics"]["mIoU"] <= 1.0
        coords = json.loads((tdir / "trial.json").read_text())
        assert (coords["task"], coords["backbone"], coords["fraction"], coords["seed"]) == \
            ("seg", "recap-clip", float(f[1:]), 0)
    assert len(list((tmp_path / "sweep" / "tune").iterdir())) == 1  # one experiment, restored, not a new one
    rows = (tmp_path / "sweep" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    factors = json.loads((tmp_path / "sweep" / "factors.json").read_text())
    assert factors["seg"]["reference"] == "alt-text-clip" and "recap-clip" in factors["seg"]["backbones"]
    with Image.open(tmp_path / "sweep" / "seg.png") as im:
        im.verify()

    third = run(build_config(SweepConfig, data))                    # everything done: nothing is launched
    assert third["skipped"] == 4 and third["failed"] == [] and "experiment" not in third


@pytest.mark.timeout(600)  # a trial that never ends (see train_reports_to_tune) fails here, not at CI's limit
def test_asha_sweep_gets_intermediate_metrics(ray_local, ade_root, tmp_path, capsys):
    data = _tiny(ade_root, tmp_path / "hp", fractions=[1.0], report={"reference": None},
                 backbones=[{"name": "clip", "backbone": {"name": "clip-tiny", "checkpoint": None}}],
                 search_space={"train.optim.lr": {"grid": [1e-3, 1e-4]}},
                 scheduler={"type": "asha", "grace_period": 2, "max_t": 4, "reduction_factor": 2},
                 tracking={"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "hp"},
                           "tensorboard": True, "wandb": {"project": "hp", "mode": "offline"}})
    data["tasks"][0]["overrides"].update({"train.eval_every": 2, "train.schedule.total_steps": 4,
                                          "eval.mode": "whole", "data.max_eval_images": 2})
    summary = run(build_config(SweepConfig, data))
    assert summary["failed"] == []
    # the driver prints a line per trial result; both trials reach ASHA's first rung
    trial_line = re.compile(r"\[clipdense\] seg/clip/f1/s0/hp-\w+  step 2/4  loss .* ETA .* eval .*mIoU")
    assert len([ln for ln in capsys.readouterr().out.splitlines() if trial_line.match(ln)]) == 2
    exp = tmp_path / "hp" / "tune"
    results = [json.loads(line) for f in exp.glob("*/*/result.json") for line in f.read_text().splitlines()]
    eval_steps = sorted({r["step"] for r in results if "eval/mIoU" in r})
    assert eval_steps[:2] == [2, 4]                                 # reported at each eval interval, not just the end
    done = list((tmp_path / "hp" / "trials").glob("seg/clip/f1/s0/hp-*/metrics.json"))
    stopped = list((tmp_path / "hp" / "trials").glob("seg/clip/f1/s0/hp-*/early_stopped.json"))
    assert len(done) + len(stopped) == 2 and done                  # the better trial at least runs to the end
    lrs = {json.loads((p.parent / "trial.json").read_text())["hparams"]["train.optim.lr"] for p in done + stopped}
    assert lrs == {1e-3, 1e-4}
    assert "hparams" in (tmp_path / "hp" / "report.md").read_text()
    import mlflow  # Tune's MLflowLoggerCallback: one run per trial
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("hp").experiment_id])
    assert len(runs) == 2                                           # each trial logged once (the trial itself: not)
    assert all(client.get_metric_history(r.info.run_id, "eval/mIoU") for r in runs)
    # TensorBoard (tensorboardX, Tune's own logger): one event file per trial, with the eval history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_dirs = sorted(p.parent for p in exp.glob("*/*/result.json"))
    assert len(trial_dirs) == 2
    for tdir in trial_dirs:
        acc = EventAccumulator(str(tdir))
        acc.Reload()
        reported = [json.loads(line) for line in (tdir / "result.json").read_text().splitlines()]
        tb = [e.value for e in acc.Scalars("ray/tune/eval/mIoU")]  # one point per report (Tune's iteration)
        assert tb and tb == pytest.approx([r["eval/mIoU"] for r in reported if "eval/mIoU" in r][:len(tb)])
    # W&B (offline, Tune's WandbLoggerCallback): one run per trial under <out>/wandb, each with its eval history
    from tracking_files import finished_wandb_records, wandb_history

    runs = sorted((tmp_path / "hp" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    for f in runs:
        (tdir,) = exp.glob(f"*/*_{f.stem.removeprefix('run-')}")  # the W&B run id is Tune's trial id
        reported = [json.loads(line) for line in (tdir / "result.json").read_text().splitlines()]
        logged = [h["eval/mIoU"] for h in wandb_history(finished_wandb_records(f)) if "eval/mIoU" in h]
        assert logged and logged == pytest.approx([r["eval/mIoU"] for r in reported if "eval/mIoU" in r])
