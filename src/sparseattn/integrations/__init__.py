"""transformers integration: attention registry patching and Q/K/V capture.

Importing this package does not import transformers; :func:`patch_model` does, when called.
"""

from sparseattn.integrations.transformers_patch import (
    ATTN_NAME,
    PatchHandle,
    PatternConfig,
    PatternPredictor,
    attention_layers,
    describe_predictor,
    get_handle,
    masked_sdpa_attention,
    patch_model,
    pattern_predictor,
    resolve_predictor,
    unpatch_model,
)
from sparseattn.integrations.capture import capture_qkv
from sparseattn.integrations.speculative import SpeculativeResult, speculative_generate

__all__ = ["ATTN_NAME", "PatchHandle", "PatternConfig", "PatternPredictor", "SpeculativeResult", "attention_layers",
           "capture_qkv", "describe_predictor", "get_handle", "masked_sdpa_attention", "patch_model", "pattern_predictor",
           "resolve_predictor", "speculative_generate", "unpatch_model"]
