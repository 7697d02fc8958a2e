"""Random-weight mlx-lm models built in code, and model directories mlx-lm loads offline
(config.json, model.safetensors, a small byte-level tokenizer): for the speed benchmarks, and
for tests and examples that need a model without a download."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Tiny configs of every supported architecture (3 layers, hidden 64, 8 experts, top-2,
# vocabulary 320), as data: the sizes all share, the fields a family shares, each one's own.
_TINY = json.loads(Path(__file__).with_name("tiny_configs.json").read_text())
TINY_CONFIGS: dict[str, dict] = _TINY["models"]


def tiny_config(model_type: str, **overrides) -> dict:
    """The mlx-lm config of a tiny random ``model_type`` model, with ``overrides``."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for '{model_type}'; have {sorted(TINY_CONFIGS)}")
    own = dict(TINY_CONFIGS[model_type])
    family = _TINY["families"].get(own.pop("family", None), {})
    return {**_TINY["common"], **family, **own, "model_type": model_type, **overrides}


def random_model(config: dict, seed: int = 0, std: float = 0.1) -> nn.Module:
    """An mlx-lm model from ``config`` with N(0, std) weights (norm scales stay 1)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)

    def init(path, w):
        if "norm" in path or w.ndim == 0:
            return w
        return mx.random.normal(w.shape, dtype=w.dtype) * std

    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, init(k, v)) for k, v in params.items()])
    mx.eval(model.parameters())
    return model


def _byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a few lines; the fast-tokenizer JSON."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The patient presents with fever and cough. The answer is A.",
        "Question: which expert handles this token? Answer: B",
        "def route(x): return top_k(softmax(x @ W))",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_model_dir(model: nn.Module, config: dict, path: str | Path) -> Path:
    """Write an mlx-lm model directory for ``model`` with a small byte-level tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 0}, indent=2))
    save_tokenizer(path, config["vocab_size"])
    return path


def save_tokenizer(path: str | Path, vocab_size: int) -> None:
    """Write the small byte-level tokenizer (ids below ``min(vocab_size, 300)``) into ``path``."""
    path = Path(path)
    _byte_tokenizer(min(vocab_size, 300)).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "chat_template": _CHAT_TEMPLATE,
            }
        )
    )
