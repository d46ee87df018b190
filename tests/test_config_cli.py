import subprocess
import sys
from typing import Literal

import pytest

from clipdense.config import Config, ConfigError, apply_override, deep_merge, load_config, set_dotted


class Optim(Config):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)


class Demo(Config):
    name: str
    kind: Literal["a", "b"] = "a"
    optim: Optim = Optim()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\noptim:\n  lr: 0.1\n")
    cfg = load_config(Demo, p, ["optim.lr=3e-4", "kind=b", "optim.betas=[0.9,0.95]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.kind == "b" and cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("text,overrides,needle", [
    ("name: x\nbogus: 1\n", [], "unknown key 'bogus'"),
    ("name: x\n", ["optim.lrr=1"], "unknown key 'optim.lrr'"),
    ("name: x\noptim:\n  lr: fast\n", [], "key 'optim.lr'"),
    ("kind: a\n", [], "missing required key 'name'"),
    ("name: x\nkind: c\n", [], "key 'kind'"),
    ("name: [x\n", [], "invalid YAML"),
    ("name: x\n", ["novalue"], "not of the form key=value"),
])
def test_bad_configs_give_one_line_errors(tmp_path, text, overrides, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(Demo, p, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_dotted_set_makes_sections_copies_values_and_refuses_to_descend_into_a_scalar():
    data = {"optim": {"lr": 1.0}, "name": "x"}
    value = [1, 2]
    set_dotted(data, "a.b.c", value)
    value.append(3)                                      # the config holds a copy
    apply_override(data, "optim.betas=[0.9,0.95]")
    assert data == {"optim": {"lr": 1.0, "betas": [0.9, 0.95]}, "name": "x", "a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="key 'name.first': 'name' is not a section"):
        apply_override(data, "name.first=y")


def test_deep_merge_merges_sections_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1], "c": {"k": 1}}
    out = deep_merge(base, {"a": {"y": {"w": 3}}, "b": [2], "c": None})
    assert out == {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "b": [2], "c": None}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1], "c": {"k": 1}}   # untouched


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Demo, tmp_path / "nope.yaml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clipdense.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = _cli("synth", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_cli_unknown_key_and_print_config(tmp_path):
    r = _cli("synth", "--out", str(tmp_path), "nonsense.key=1")
    assert r.returncode == 2 and "nonsense" in r.stderr and "Traceback" not in r.stderr
    r = _cli("synth", "--out", str(tmp_path), "--seed", "7", "--print-config")
    assert r.returncode == 0 and "seed: 7" in r.stdout


def test_every_stage_and_tool_imports():
    import importlib

    from clipdense.cli import STAGES, TOOLS
    from clipdense.config import Config

    for module, cls in STAGES.values():
        m = importlib.import_module(module)
        loader = getattr(m, cls)  # a Config, or finetune's loader of its discriminated union
        assert callable(m.run) and (issubclass(loader, Config) or isinstance(loader.model_validate({}), Config))
    for target in TOOLS.values():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn))


def test_tiny_models_build():
    from clipdense.models import create_clip, tokenizer_for

    for name in ("clip-tiny", "coca-tiny"):
        m = create_clip(name)
        assert m.visual.image_size == (64, 64) and sum(p.numel() for p in m.parameters()) < 10_000_000
    assert tokenizer_for("clip-tiny")(["a red cube"]).shape == (1, 32)


def test_random_coca_vocab_projection_is_initialised():
    """open_clip leaves CoCa's text_decoder.text_projection as torch.empty; create_clip must initialise it."""
    import torch

    from clipdense.models import create_clip

    torch.use_deterministic_algorithms(True)  # makes torch.empty fill with NaN, exposing uninitialised memory
    try:
        m = create_clip("coca-tiny")
    finally:
        torch.use_deterministic_algorithms(False)
    w = m.text_decoder.text_projection
    assert torch.isfinite(w).all() and w.std() > 0


def test_shipped_configs_by_name_and_listing(tmp_path, monkeypatch, capsys):
    from clipdense.cli import main
    monkeypatch.chdir(tmp_path)   # no checkout here: names resolve to the package's shipped configs
    assert main(["pretrain", "--config", "clip-tiny-shapes", "--print-config"]) == 0
    assert "clip-tiny" in capsys.readouterr().out
    own = tmp_path / "clip-tiny-shapes"          # an existing file path wins over a shipped name
    own.write_text("model: {name: clip-demo}\n")
    assert main(["pretrain", "--config", str(own.name), "--print-config"]) == 0
    assert "clip-demo" in capsys.readouterr().out
    assert main(["pretrain", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-config" in err and "clip-tiny-shapes" in err and "\n" not in err
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "pretrain/clip-tiny-shapes" in listing and "demo/quick" in listing
    assert main(["configs", "show", "demo/quick"]) == 0 and "scale" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("clipdense ")


def test_report_takes_its_folder_before_or_after_flags(tmp_path, capsys):
    from clipdense.cli import main
    for argv in (["report", str(tmp_path), "--print-config"], ["report", "--print-config", str(tmp_path)],
                 ["report", "--print-config", str(tmp_path), "reference=recap"],
                 ["report", str(tmp_path), "reference=recap", "--print-config", "quiet=true"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert f"results_dir: {tmp_path}" in out
    assert "reference: recap" in out and "quiet: true" in out   # overrides on both sides of a flag


def test_a_user_error_behind_ray_wrappers_is_found_by_type_or_by_its_remote_text():
    """What a worker raised reaches the caller as its one line: by type through causes, and by text where Ray
    only kept a remote traceback's string (a Ray Data task with count_errors off)."""
    from clipdense.config import DataError, UserError, raise_user_error_behind, user_error_behind

    class Wrapper(RuntimeError):
        def __init__(self, msg, cause=None):
            super().__init__(msg)
            self.cause = cause

    typed = Wrapper("Train worker failed", DataError("shard 3: no syn_score\nmore detail"))
    assert isinstance(user_error_behind(typed), DataError)
    remote = RuntimeError("ray.exceptions.RayTaskError(DataError): ray::Map(join)\nTraceback ...\n"
                          "clipdense.config.errors.DataError: captions.min_score: shard x.tar has no syn_score\n")
    found = user_error_behind(Wrapper("task failed", remote))
    assert type(found) is DataError and str(found) == "captions.min_score: shard x.tar has no syn_score"
    with pytest.raises(DataError) as e:
        raise_user_error_behind(typed)
    assert str(e.value) == "shard 3: no syn_score" and e.value.__cause__ is None
    assert user_error_behind(RuntimeError("ValueError: clipdense.config.errors is fine")) is None
    plain = UserError("already one line")
    raise_user_error_behind(plain)     # the error itself: the caller re-raises it unchanged
