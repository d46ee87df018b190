"""The vLLM engine adapter: prompt building, sampling parameters, output parsing and error paths.

vLLM is CUDA-only and not installed here, so these tests run the adapter against a TEST DOUBLE of the `vllm`
module (`FakeVLLM` below, installed into sys.modules by monkeypatch): it records what the adapter passes to
`vllm.LLM(...)`, `LLM.chat(...)` and `SamplingParams(...)` and returns RequestOutput-shaped objects. It checks
our side of the contract only; `test_real_vllm_on_gpu` runs the real thing where vLLM and a GPU exist.
"""
import os
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from clipdense.config import build_config
from clipdense.errors import ConfigError
from clipdense.recaption import RecaptionConfig
from clipdense.recaption.engines import build_captioner, image_input, provenance
from clipdense.recaption.engines.base import EngineOutputError
from clipdense.recaption.engines.vllm import VLLMCaptioner, build_messages, parse_outputs
from shard_files import jpeg_bytes


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
            for i, _ in enumerate(messages):
                sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                texts = completions(i, sp.n) if completions else [
                    f"  caption {i}-{k}\nsecond sentence. " for k in range(sp.n)]
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
    assert init["seed"] == 0  # reproducible through the engine seed, not a per-request one
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


def test_adapter_cut_at_period_and_provenance(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm())
    cfg = _cfg(num_captions=2, cut_at_period=True)
    out = build_captioner(cfg.engine).generate([np.zeros((4, 4, 3), np.uint8)], 2)
    assert out == [["caption 0-0 second sentence", "caption 0-1 second sentence"]]  # text after '.' dropped
    prov = provenance(cfg.engine)
    assert prov["engine"] == "vllm" and prov["prompt"] == cfg.engine.prompt and '"n": 2' in prov["sampling"]
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
