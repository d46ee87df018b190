"""The model an evaluation runs: open_clip's, with its eval preprocessing and tokenizer, by name (our configs
registered) or from an exported folder (`local-dir:`) or the Hugging Face hub (`hf-hub:`)."""
from __future__ import annotations

import open_clip

from clipdense.config import ConfigError
from clipdense.models.registry import create_clip_and_transforms, register_model_configs

SCHEMAS = ("hf-hub:", "local-dir:")


def load_model(name: str, pretrained: str | None):
    """(model in eval mode, eval preprocess, tokenizer), as open_clip's create_model_and_transforms builds them."""
    try:
        if pretrained and pretrained.startswith(SCHEMAS):  # open_clip takes these as the model name
            register_model_configs()
            model, _, preprocess = open_clip.create_model_and_transforms(pretrained)
            tokenizer = open_clip.get_tokenizer(pretrained)
        else:
            model, _, preprocess = create_clip_and_transforms(name, pretrained)
            tokenizer = open_clip.get_tokenizer(name)
    except ValueError as e:
        raise ConfigError(f"model: {str(e).splitlines()[0][:200]}") from None
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise ConfigError(f"model.pretrained {pretrained!r}: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), preprocess, tokenizer
