"""Tiny random transformers models for the tests (built locally, never downloaded; needs transformers).

Each builder seeds torch's global generator (``torch.manual_seed(seed)``) right before building, so a
model is the same on every call with the same arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_llama", "tiny_gemma3", "write_word_text"]

_WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly box jumping frogs".split()


def tiny_llama(*, seed: int = 0, layers: int = 2, **config: Any) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` in eval mode: vocab 97, hidden 64, MLP 128, 4 heads over 2 KV heads,
    512 positions, ``layers`` layers; ``config`` overrides or adds ``LlamaConfig`` fields."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    kw.update(config)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def tiny_gemma3(*, sliding_window: int = 24, seed: int = 0, head_dim: int = 16) -> torch.nn.Module:
    """A random ``Gemma3ForCausalLM`` in eval mode: 4 layers alternating sliding-window (``sliding_window``
    tokens) and full attention, hidden 64, 4 heads over 2 KV heads of ``head_dim`` (16; the Triton decode kernels
    need 64, 128 or 256), vocab 97, 512 positions."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                        sliding_window=sliding_window,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        max_position_embeddings=512)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def write_word_text(path: Path, words: int, *, seed: int = 1) -> Path:
    """Write ``words`` seeded random words of a pangram to ``path`` (text for the model commands' tests)."""
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (words,), generator=g)))
    return path
