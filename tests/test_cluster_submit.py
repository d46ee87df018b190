"""`clipdense submit`: the job it builds, token lookup, and one-line exit-2 errors for user mistakes (no cluster)."""
from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from clipdense.config import UserError
from clipdense.jobs import client as client_mod
from clipdense.jobs.build import EXCLUDES, SubmitArgs, build_job, find_project_root
from clipdense.jobs.submit import main_submit

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_project_root_found_from_a_subfolder():
    assert find_project_root(ROOT / "tests") == ROOT
    assert (find_project_root(ROOT / "tests") / "clipdense" / "jobs" / "entry.py").is_file()


def test_job_for_a_config_inside_the_working_dir(tmp_path):
    wd = tmp_path / "proj"
    (wd / "clipdense" / "jobs").mkdir(parents=True)
    (wd / "clipdense" / "jobs" / "entry.py").write_text("")
    (wd / "exp").mkdir()
    cfg = wd / "exp" / "my run.yaml"
    cfg.write_text("task: seg\n")
    entry, env = build_job(SubmitArgs(stage="finetune", config=str(cfg), overrides=["optim.lr=1e-4", "name=a b"],
                                      working_dir=str(wd), pip=["einops"], validate=False))
    assert shlex.split(entry) == ["python", "-m", "clipdense.jobs.entry", "finetune", "--config", "exp/my run.yaml",
                                  "optim.lr=1e-4", "name=a b"]
    assert env["working_dir"] == str(wd.resolve()) and env["pip"] == ["einops"]
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"] and "runs/" in env["excludes"]
    assert env["excludes"] == EXCLUDES


def test_image_uri_job_runs_the_packaged_entry():
    entry, env = build_job(SubmitArgs(stage="pretrain", config="/home/ray/clipdense/configs/p.yaml",
                                      overrides=["steps=10"], image_uri="reg/clipdense:1"))
    assert shlex.split(entry) == ["python", "-m", "clipdense.jobs.entry", "pretrain", "--config",
                                  "/home/ray/clipdense/configs/p.yaml", "steps=10"]
    assert set(env) == {"image_uri", "env_vars"}, "Ray rejects image_uri together with working_dir or pip"


@pytest.mark.parametrize("args,needle", [
    (SubmitArgs(stage="train"), "unknown stage 'train'"),
    (SubmitArgs(stage="pretrain", config="missing.yaml"), "config file not found"),
    (SubmitArgs(stage="pretrain", overrides=["lr"]), "not of the form key=value"),
    (SubmitArgs(stage="probe", overrides=["gpus=1"]), "bad argument 'gpus=1'"),
    (SubmitArgs(stage="demo", image_uri="x", pip=["a"]), "--image-uri cannot be combined"),
])
def test_build_job_user_mistakes(args, needle):
    with pytest.raises(UserError, match=needle):
        build_job(args)


def test_config_outside_working_dir_is_refused(tmp_path):
    cfg = tmp_path / "elsewhere.yaml"
    cfg.write_text("a: 1\n")
    with pytest.raises(UserError) as e:
        build_job(SubmitArgs(stage="pretrain", config=str(cfg), working_dir=str(ROOT)))
    assert "outside the working dir" in str(e.value) and "\n" not in str(e.value)


def test_invalid_yaml_is_caught_before_submitting(tmp_path):
    (tmp_path / "clipdense" / "jobs").mkdir(parents=True)
    (tmp_path / "clipdense" / "jobs" / "entry.py").write_text("")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("a: [1\n")
    with pytest.raises(UserError, match="invalid YAML"):
        build_job(SubmitArgs(stage="pretrain", config=str(cfg), working_dir=str(tmp_path)))


@pytest.mark.parametrize("argv,needle", [
    (["train", "--address", "http://127.0.0.1:8265"], "unknown stage"),
    (["pretrain", "--config", "nope.yaml", "--address", "http://127.0.0.1:8265"], "config file not found: nope.yaml"),
    (["probe", "--address", "127.0.0.1:8265"], "bad address"),
    (["probe", "--address", "http://127.0.0.1:port"], "bad address"),
    (["probe", "--address", "http://127.0.0.1:{closed}"], "cannot reach the Ray dashboard"),
    (["status", "--address", "http://127.0.0.1:8265"], "usage: clipdense submit status JOB_ID"),
    (["probe", "--follow", "--no-wait", "--address", "http://127.0.0.1:8265"], "exclude each other"),
    (["probe", "--address", "http://127.0.0.1:8265", "--token-file", "/nonexistent/tok"], "token file not found"),
])
def test_main_submit_user_mistakes_exit_2_with_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    argv = [a.format(closed=_closed_port()) for a in argv]
    assert main_submit(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_main_submit_without_address(capsys, monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert main_submit(["probe"]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_token_lookup_order(tmp_path, monkeypatch):
    f1, f2, home = tmp_path / "t1", tmp_path / "t2", tmp_path / "home_token"
    f1.write_text("tok-file\n")
    f2.write_text("tok-path\n")
    home.write_text("tok-home")
    monkeypatch.setattr(client_mod, "DEFAULT_TOKEN_PATH", home)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert client_mod.read_token() == "tok-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f2))
    assert client_mod.read_token() == "tok-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-env")
    assert client_mod.read_token() == "tok-env"
    assert client_mod.read_token(f1) == "tok-file"
    home.unlink()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert client_mod.read_token() is None


def test_cli_dispatches_to_submit_and_cluster(capsys):
    from clipdense.cli import main

    assert main(["submit", "nope", "--address", "http://127.0.0.1:8265"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["cluster", "up"]) == 2
    assert "only --local" in capsys.readouterr().err


def test_probe_arguments():
    from clipdense.jobs.probe import parse

    assert parse(["nodes=3", "seconds=0.5"]) == {"nodes": 3, "cpus": 1, "seconds": 0.5, "timeout": 300.0}
    with pytest.raises(ValueError):
        parse(["nodes"])
