"""Benchmark shapes, each annotated with the model whose attention it mirrors.

Tensors are ``(B, H, N, D)``; ``kv_heads`` < ``heads`` means GQA. Ordered by priority: when a
device call runs short of time, the benchmark drops shapes from the end and says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    causal: bool

    @property
    def name(self) -> str:
        return f"{self.model}/{self.seqlen // 1024}K/{'causal' if self.causal else 'full'}"


LLAMA_8B = "Llama-3.1-8B"      # 32 query heads, 8 kv heads, head_dim 128
SMOLLM2 = "SmolLM2-135M"       # 9 query heads, 3 kv heads, head_dim 64
HD256 = "hd256"                # head_dim 256 (Gemma-style), 4 query heads, 1 kv head

SHAPES: list[Shape] = [
    Shape(LLAMA_8B, 1, 32, 8, 32768, 128, True),    # the headline shape
    Shape(LLAMA_8B, 1, 32, 8, 32768, 128, False),
    Shape(LLAMA_8B, 1, 32, 8, 8192, 128, True),
    Shape(LLAMA_8B, 1, 32, 8, 16384, 128, True),
    Shape(LLAMA_8B, 1, 32, 8, 65536, 128, True),
    Shape(LLAMA_8B, 1, 32, 8, 8192, 128, False),
    Shape(LLAMA_8B, 1, 32, 8, 16384, 128, False),
    Shape(LLAMA_8B, 1, 32, 8, 65536, 128, False),
    Shape(SMOLLM2, 1, 9, 3, 8192, 64, True),
    Shape(SMOLLM2, 1, 9, 3, 32768, 64, True),
    Shape(HD256, 1, 4, 1, 32768, 256, True),
]

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
LAYOUT_BLOCK = 128  # layout block_m = block_n (FlexAttention's default block size)
