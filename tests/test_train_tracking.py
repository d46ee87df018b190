"""Watching a run: progress lines while it goes, TensorBoard event files, a real MLflow server on loopback (and one
that dies mid-run), W&B offline, and a missing tracking library as a one-line error."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import train_toy
from tracking_files import finished_wandb_records, wandb_history
from train_toy import Toy

from clipdense.config import ConfigError, build_config
from clipdense.train import TrainConfig, fit, fit_local
from clipdense.train.tracking import TrackingConfig

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _cfg(out, steps=20) -> TrainConfig:
    return build_config(TrainConfig, {"out_dir": str(out), "schedule": {"total_steps": steps}, "log_every": 5,
                                      "eval_every": 10, "optim": {"lr": 1e-2}})


def _tracking(**kw) -> TrackingConfig:
    return build_config(TrackingConfig, {"progress": "off", **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_lines_arrive_while_the_run_goes(tmp_path):
    # A slow toy (0.2 s per batch) in a child process: the first progress line must reach us long before the end.
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from train_toy import Toy\n"
            "from clipdense.config import build_config\n"
            "from clipdense.train import TrainConfig, fit_local\n"
            "from clipdense.train.tracking import TrackingConfig\n"
            "class Slow(Toy):\n"
            "    def loss(self, model, batch, ctx):\n"
            "        time.sleep(0.2)\n"
            "        return super().loss(model, batch, ctx)\n"
            "cfg = build_config(TrainConfig, {'out_dir': %r, 'schedule': {'total_steps': 30}, 'log_every': 5})\n"
            "fit_local(Slow, cfg, tracking=TrackingConfig(progress='lines'))\n") % (str(TESTS), str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
                                "PYTHONPATH", "")])})
    first_line, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_line is None and line.startswith("[clipdense] step"):
            first_line = line
            assert not (tmp_path / "result.json").exists()  # the run is still going
    assert proc.wait(120) == 0
    steps = [ln for ln in lines if ln.startswith("[clipdense] step")]
    assert [ln.split()[2] for ln in steps] == ["5/30", "10/30", "15/30", "20/30", "25/30", "30/30"]
    for key in ("loss ", "lr ", "samples/s", "data wait", "ETA "):
        assert key in first_line
    assert "ETA 0:00:0" in steps[1] or "ETA 0:00:" in steps[1]  # ~20 steps x 0.2 s left


def test_ray_train_run_prints_progress_and_tracker_warnings_on_the_driver(ray_local, tmp_path, capsys):
    # Rank 0 runs in a Ray Train worker, whose own output never reaches this process (the local Ray runs with
    # log_to_driver=False); nothing listens on the port, so its MLflow tracker fails to start there.
    cfg = build_config(TrainConfig, {"out_dir": str(tmp_path), "schedule": {"total_steps": 20}, "log_every": 5,
                                     "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}})
    tracking = _tracking(progress="lines", mlflow={"tracking_uri": f"http://127.0.0.1:{_free_port()}"})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(train_toy)  # Ray workers cannot import tests/ modules
    try:
        with pytest.warns(UserWarning, match="could not start a tracker"):
            assert fit(Toy, cfg, tracking=tracking)["step"] == 20
    finally:
        cloudpickle.unregister_pickle_by_value(train_toy)
    steps = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[clipdense] step")]
    assert [ln.split()[2] for ln in steps] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(key in steps[1] for key in ("loss ", "lr ", "samples/s", "data wait", "ETA "))


def test_tensorboard_reader_finds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_local(Toy, _cfg(tmp_path), tracking=_tracking(tensorboard=True), params={"train": {"seed": 0}})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "samples_per_s", "data_wait_frac"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [5, 10, 15, 20]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in logged if "loss" in r)
    assert acc.Scalars("loss")[0].value == pytest.approx(first_loss, rel=1e-6)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a file-backed store; yields (url, process)."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    store = tmp_path / "mlflow-store"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{store}.db",
                             "--default-artifact-root", str(tmp_path / "mlflow-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request
    deadline = time.monotonic() + 240  # its start (database migrations) takes seconds; minutes on a busy box
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pytest.fail("mlflow server did not start")
            time.sleep(0.2)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def test_mlflow_server_gets_params_metrics_and_the_export(tmp_path, mlflow_server):
    import mlflow

    url, _ = mlflow_server

    class Exporting(Toy):
        def export(self, model, out_dir):
            (out_dir / "export").mkdir(exist_ok=True)
            (out_dir / "export" / "model.txt").write_text("weights")
            return {}

    tracking = _tracking(mlflow={"tracking_uri": url, "experiment": "t", "run_name": "toy"})
    fit_local(Exporting, _cfg(tmp_path / "run"), tracking=tracking,
              params={"model": {"name": "toy"}, "train": {"optim": {"lr": 0.01}}})
    client = mlflow.MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "toy" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.name"] == "toy" and runs[0].data.params["train.optim.lr"] == "0.01"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "export")] == ["export/model.txt"]


def test_a_tracking_server_that_dies_mid_run_does_not_stop_training(tmp_path, mlflow_server):
    url, proc = mlflow_server

    class KillsServer(Toy):
        def loss(self, model, batch, ctx):
            if ctx.step == 7 and proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)
            return super().loss(model, batch, ctx)

    tracking = _tracking(mlflow={"tracking_uri": url, "experiment": "dies"})
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="mlflow failed"):
        result = fit_local(KillsServer, _cfg(tmp_path / "run"), tracking=tracking)
    assert result["step"] == 20 and not result["stopped_early"]
    assert time.perf_counter() - t0 < 60  # short client timeouts: no minutes-long retry loop


class _Exporting(Toy):
    def export(self, model, out_dir):
        (out_dir / "export").mkdir(exist_ok=True)
        (out_dir / "export" / "model.txt").write_text("weights")
        return {}


def _read_back_in_a_fresh_process(uri: str, experiment: str) -> dict:
    """What `mlflow ui --backend-store-uri URI` would show, read by another process without MLFLOW_ALLOW_FILE_STORE."""
    code = ("import json, sys, mlflow\n"
            "c = mlflow.MlflowClient(tracking_uri=sys.argv[1])\n"
            "(run,) = c.search_runs([c.get_experiment_by_name(sys.argv[2]).experiment_id])\n"
            "print(json.dumps({'status': run.info.status, 'name': run.info.run_name, 'params': run.data.params,\n"
            "                  'artifacts': [a.path for a in c.list_artifacts(run.info.run_id, 'export')]}))\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    out = subprocess.run([sys.executable, "-c", code, uri, experiment], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_store_directory_is_a_sqlite_database_that_opens_as_it_is(tmp_path, monkeypatch):
    """The local default: a bare directory path holds `mlflow.db` (and the runs' artefacts), which another process
    (`mlflow ui`) opens without MLFLOW_ALLOW_FILE_STORE."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # a relative store is made absolute at config time (Ray workers have another cwd)
    tracking = _tracking(mlflow={"tracking_uri": "runs/mlflow", "experiment": "db", "run_name": "toy"})
    assert tracking.mlflow.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow/mlflow.db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_local(_Exporting, _cfg(tmp_path / "run"), tracking=tracking, params={"model": {"name": "toy"}})
    assert not [w for w in caught if "tracking:" in str(w.message)]  # started, and never switched off
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # nothing to allow: not a file store
    run = _read_back_in_a_fresh_process(tracking.mlflow.tracking_uri, "db")
    assert run["status"] == "FINISHED" and run["name"] == "toy" and run["params"]["model.name"] == "toy"
    assert run["artifacts"] == ["export/model.txt"]
    assert list((tmp_path / "runs" / "mlflow" / "mlartifacts").rglob("model.txt"))  # beside the database


def test_the_default_store_is_mlflows_own_sqlite_database():
    assert _tracking(mlflow={}).mlflow.tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@pytest.mark.parametrize("form", ["existing-folder", "file-uri"])
def test_mlflow_file_store_is_read_back_with_the_uri_the_user_gave(tmp_path, monkeypatch, form):
    # MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true: clipdense sets it for a file store the user
    # named, a file: URI or a folder an earlier run wrote (the reader below, in this process, sees it too; another
    # process sets it itself, as docs/tracking-and-export.md says)
    import mlflow

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"file://{tmp_path}/mlruns"
    if form == "existing-folder":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # an earlier run's file store (experiment 0)
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
        uri = "mlruns"
    tracking = _tracking(mlflow={"tracking_uri": uri, "experiment": "fs", "run_name": "toy"})
    assert tracking.mlflow.tracking_uri in (str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_local(_Exporting, _cfg(tmp_path / "run"), tracking=tracking,
                  params={"model": {"name": "toy"}, "train": {"optim": {"lr": 0.01}}})
    assert not [w for w in caught if "tracking:" in str(w.message)]  # started, and never switched off
    assert (tmp_path / "mlruns").is_dir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fs").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "toy" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.name"] == "toy" and runs[0].data.params["train.optim.lr"] == "0.01"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged
                                                     if "loss" in r]
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "export")] == ["export/model.txt"]


def test_local_store_uris_are_made_absolute_where_the_config_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = lambda u: _tracking(mlflow={"tracking_uri": u}).mlflow.tracking_uri  # noqa: E731
    assert uri("runs/mlruns") == f"sqlite:///{tmp_path}/runs/mlruns/mlflow.db"
    assert uri("runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert uri("file:mlruns") == f"file://{tmp_path}/mlruns"
    assert uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="tracking_uri"):
        uri(" ")


@pytest.mark.parametrize("bad,message", [
    ("foo://nowhere", r"tracking.mlflow.tracking_uri 'foo://nowhere': MLflow cannot use it \("),
    ("FILE/store", r"cannot create the database directory"),
    ("file://FILE/store", r"cannot create the file store directory"),
])
def test_an_mlflow_store_that_cannot_work_is_one_line_before_training(tmp_path, bad, message):
    (tmp_path / "FILE").write_text("a file, not a directory")
    bad = bad.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(ConfigError, match=message) as err:
        fit_local(Toy, _cfg(tmp_path / "run"), tracking=_tracking(mlflow={"tracking_uri": bad}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training, not warned and skipped


def test_sweep_mlflow_callback_gets_the_same_store(tmp_path, monkeypatch):
    import mlflow

    from clipdense.sweep.callbacks import tune_callbacks

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    (callback,) = tune_callbacks(_tracking(mlflow={"tracking_uri": "mlruns", "experiment": "sweep"}))
    assert callback.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    callback.setup()  # what Tune calls on the driver: finds or creates the experiment in the sqlite store
    assert mlflow.MlflowClient(callback.tracking_uri).get_experiment_by_name("sweep") is not None
    with pytest.raises(ConfigError, match="cannot create the database directory"):
        (tmp_path / "f").write_text("")
        tune_callbacks(_tracking(mlflow={"tracking_uri": "f/mlruns"}))


def test_wandb_offline_records_the_run(tmp_path):
    fit_local(Toy, _cfg(tmp_path), tracking=_tracking(wandb={"project": "clipdense-test", "mode": "offline"}),
              params={"seed": 3})
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = finished_wandb_records(files[0])
    history = wandb_history(records)
    assert [h["_step"] for h in history] == [5, 10, 15, 20]
    losses = [h["loss"] for h in history if "loss" in h]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in logged if "loss" in r])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {u.key: u.value_json for u in run.config.update}["seed"] == "3"


def test_a_missing_tracking_library_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tracking.mlflow needs the 'mlflow' package: pip install "
                                          r"\"clipdense\[tracking\]\""):
        fit_local(Toy, _cfg(tmp_path), tracking=_tracking(mlflow={"tracking_uri": str(tmp_path / "m")}))


def test_sweep_prints_a_line_per_trial_result_once(capsys):
    # Tune's own Trial objects (stubs: no trainable runs); results as Tune hands them to driver callbacks.
    from ray.tune.experiment import Trial

    from clipdense.sweep.callbacks import TrialProgress
    from clipdense.sweep.grid import hparam_label

    trial = Trial("__fake", config={"trial": "seg/clip/f1/s0", "hp": {"train.schedule.total_steps": 8}}, stub=True)
    other = Trial("__fake", config={"trial": "seg/clip/f0.5/s0"}, stub=True)
    shown, quiet = TrialProgress("lines", {"seg/clip/f1/s0": 4, "seg/clip/f0.5/s0": 6}), TrialProgress("off", {})
    for cb in (shown, quiet):
        cb.on_trial_result(1, [], trial, {"step": 2, "loss": 1.5, "lr": 1e-3, "eval/mIoU": 0.25})
        cb.on_trial_result(1, [], other, {"step": 3.0, "loss": 2.0})
        cb.on_trial_result(2, [], trial, {"step": 8, "loss": 1.0, "eval/mIoU": 0.5})
        cb.on_trial_result(3, [], trial, {"step": 8.0, "loss": 1.0, "eval/mIoU": 0.5, "skipped": 0.0})  # closing
        cb.on_trial_complete(3, [], trial)
    lines = capsys.readouterr().out.splitlines()
    name = "[clipdense] seg/clip/f1/s0/" + hparam_label({"train.schedule.total_steps": 8})  # the trial's directory
    assert [ln.split("  ")[:2] for ln in lines] == [[name, "step 2/8"], ["[clipdense] seg/clip/f0.5/s0", "step 3/6"],
                                                    [name, "step 8/8"]]
    assert "loss 1.5000" in lines[0] and "eval mIoU 0.25" in lines[0] and "ETA " in lines[2]


def test_eta_counts_from_the_first_logged_step(monkeypatch):
    """Startup time (workers, the first decoded blocks) before the first logged step must not slow the ETA: after
    90 s of startup and then 1 s per step, step 20 of 100 has 80 s left, not (100 - 20) * 110 / 20."""
    import io

    import clipdense.train.tracking.progress as progress_module

    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    progress = progress_module.Progress("lines", 100, stream=out)
    for t, step in ((100.0, 10), (110.0, 20)):
        now[0] = t
        progress.write({"step": step, "loss": 1.0, "lr": 0.1})
    first, second = out.getvalue().splitlines()
    assert "ETA 0:15:00" in first          # 90 left at 10 steps per 100 s: the best guess before a second line
    assert "ETA 0:01:20" in second


def test_sweep_wandb_offline_needs_no_api_key(tmp_path, monkeypatch):
    """Ray's WandbLoggerCallback asks for an API key unless the WANDB_MODE variable says offline (its own `mode`
    argument does not count): `tracking.wandb.mode: offline` must set it, or an offline sweep fails at setup."""
    from clipdense.sweep.callbacks import tune_callbacks

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # the config's mode wins (monkeypatch restores the variable)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login to fall back on
    (callback,) = tune_callbacks(_tracking(wandb={"project": "sweep", "mode": "offline"}))
    callback.setup()
    assert os.environ["WANDB_MODE"] == "offline"
