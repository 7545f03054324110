"""speculative_generate: sparse decode drafts, one exact multi-token step checks them; the tokens are dense greedy's.

Tiny random float32 models (CPU, or CUDA where present). The budgets are chosen so that plain sparse decode
really changes the greedy tokens (checked), so equality with dense greedy decoding is the verification at work.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.eval.gen_check import greedy_generate  # noqa: E402
from sparseattn.integrations import patch_model  # noqa: E402
from sparseattn.integrations.decode_route import SUMMARY_ATTR  # noqa: E402
from sparseattn.integrations.speculative import dynamic_cache, speculative_generate  # noqa: E402
from sparseattn.ops.pages import page_summaries  # noqa: E402
from sparseattn.testing.models import tiny_gemma3  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEW = 24


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval().to(DEV)


def _model(name: str):
    return _llama() if name == "llama" else tiny_gemma3(sliding_window=24, head_dim=64).to(DEV)


def _ids(n: int = 300, b: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(1)).to(DEV)


def _summaries_current(cache) -> bool:
    """Every kept page summary equals a fresh computation over the keys it describes."""
    store = getattr(cache, SUMMARY_ATTR)
    assert store
    for layer, st in store.items():
        keys = cache.layers[layer].keys
        assert st.n == keys.shape[2]
        fresh = page_summaries(keys, st.summ.page_size)
        if not (torch.equal(st.summ.kmin, fresh.kmin) and torch.equal(st.summ.kmax, fresh.kmax)):
            return False
    return True


@pytest.mark.parametrize("name, backend", [("llama", "reference"), ("gemma3", "reference"), ("llama", "triton")])
def test_speculative_tokens_equal_dense_greedy(name, backend):
    model = _model(name)
    ids = _ids()
    new = NEW if backend == "reference" else 12  # the Triton kernels run under the interpreter on the CPU: slow
    ref, _ = greedy_generate(model, ids, new, dynamic_cache(model))
    with patch_model(model, decode="sparse", decode_top_pages=2, decode_backend=backend):
        plain, _ = greedy_generate(model, ids, new, dynamic_cache(model))
    assert plain != ref  # 2 pages of 19: plain sparse decode changes the tokens, so the check below means something
    for draft in ((1, 3) if backend == "reference" else (3,)):
        with patch_model(model, decode="sparse", decode_top_pages=2, decode_backend=backend) as h:
            cache = dynamic_cache(model)
            r = speculative_generate(model, ids, new, draft_tokens=draft, cache=cache)
        assert r.tokens == ref, (draft, r)
        assert r.accepted < r.drafted  # some drafts were rejected and replaced by the exact step's token
        assert r.rounds == h.counts["decode_verify"] // 2  # 2 routed (full-attention) layers per exact step
        assert h.counts["decode_sparse"] == 2 * r.drafted
        if name == "llama":
            assert h.counts["decode_dense"] == 0 and h.decode_fallbacks == {}
        else:  # the window layers of an exact step with drafts (Lq > 1) run the model's attention
            assert 0 < h.counts["decode_dense"] <= 2 * r.rounds and set(h.decode_fallbacks) == {"sliding_window"}
        # summaries: built once after the prefill, then only updated (crops noted, not rebuilt) and current
        assert h.decode_stats["summary_builds"] == 2
        assert _summaries_current(cache)
        assert cache.get_seq_length() == ids.shape[1] + new - 1


def test_every_page_accepts_every_draft():
    model = _llama()
    ids = _ids(200)
    ref, _ = greedy_generate(model, ids, NEW, dynamic_cache(model))
    with patch_model(model, decode="sparse", decode_top_pages=1.0, decode_backend="reference"):
        r = speculative_generate(model, ids, NEW, draft_tokens=4)
    assert r.tokens == ref and r.accepted == r.drafted and r.acceptance == 1.0
    # 23 tokens after the prefill's: 4 full rounds of 5, then a round of 2 drafts + 1
    assert r.rounds == 5 and r.drafted == 4 * 4 + 2 and r.tokens_per_round == 23 / 5


def test_one_token_and_tail_rounds():
    model = _llama()
    ids = _ids(100)
    ref, _ = greedy_generate(model, ids, 2, dynamic_cache(model))
    with patch_model(model, decode="sparse", decode_top_pages=1, decode_backend="reference"):
        one = speculative_generate(model, ids, 1)
        two = speculative_generate(model, ids, 2, draft_tokens=8)
    assert one.tokens == ref[:1] and one.rounds == 0 and one.drafted == 0 and one.acceptance is None
    assert one.tokens_per_round is None
    assert two.tokens == ref and two.rounds == 1 and two.drafted == 0  # a round with no room for a draft


def test_note_crop_keeps_summaries_exact():
    """A cropped cache noted to the route: the next step updates the page the crop cut into, from the cache."""
    model = _llama()
    ids = _ids(100)
    with patch_model(model, decode="sparse", decode_top_pages=1.0, decode_backend="reference") as h, torch.no_grad():
        cache = dynamic_cache(model)
        model(ids, past_key_values=cache)
        for i in range(5):
            model(ids[:, i:i + 1], past_key_values=cache)
        cache.crop(-3)  # 102 keys: page 6 (keys 96..) partly stale in the kept summaries
        h.decode_route.note_crop(cache, 102)
        model(ids[:, :4], past_key_values=cache)  # 4 new keys: 106
        assert h.decode_stats["summary_builds"] == 2 and _summaries_current(cache)
        cache.crop(-10)  # 96: on a page boundary
        h.decode_route.note_crop(cache, 96)
        model(ids[:, :1], past_key_values=cache)
        assert h.decode_stats["summary_builds"] == 2 and _summaries_current(cache)
        with pytest.raises(ValueError, match=r"^DecodeRoute.note_crop: length must be a non-negative integer"):
            h.decode_route.note_crop(cache, -1)


def test_bad_inputs():
    model = _llama()
    ids = _ids(50)
    with pytest.raises(ValueError, match=r"^speculative_generate: model has no sparse decode route; expected a "
                                         r"model inside patch_model\(model, decode='sparse', \.\.\.\), "
                                         r"got an unpatched model$"):
        speculative_generate(model, ids, 4)
    with patch_model(model, decode="kernel"):
        with pytest.raises(ValueError, match=r"no sparse decode route; .* got decode='kernel'$"):
            speculative_generate(model, ids, 4)
    with patch_model(model, decode="sparse", decode_backend="reference"):
        for bad_ids, match in ((ids.float(), "input_ids must be a 2-D integer tensor"),
                               (ids[0], "input_ids must be a 2-D integer tensor"),
                               (_ids(50, b=2), r"input_ids must hold one non-empty sequence .*got \(2, 50\)$")):
            with pytest.raises(ValueError, match=match):
                speculative_generate(model, bad_ids, 4)
        with pytest.raises(ValueError, match=r"new_tokens must be a positive integer; expected an int >= 1, got 0$"):
            speculative_generate(model, ids, 0)
        for d in (0, 64, True, 2.0):
            with pytest.raises(ValueError, match=r"^speculative_generate: draft_tokens is out of range .*"
                                                 r"expected an int in \[1, 63\]"):
                speculative_generate(model, ids, 4, draft_tokens=d)
        with pytest.raises(ValueError, match=r"cache has no per-layer storage to roll back .* got object$"):
            speculative_generate(model, ids, 4, cache=object())
        full = dynamic_cache(model)
        with torch.no_grad():
            model(ids, past_key_values=full)
        with pytest.raises(ValueError, match=r"cache is not empty .* got 50 cached tokens$"):
            speculative_generate(model, ids, 4, cache=full)
        with pytest.raises(ValueError, match=r"time_after must be a positive integer or None"):
            speculative_generate(model, ids, 4, time_after=0)


def test_with_sparse_prefill_a_layer_subset_and_a_cache_without_config():
    """The prefill may be sparse too (the tokens are then those of greedy decoding after that prefill); layers left
    out of the route draft exactly; a DynamicCache built without the model's config (layers made on first use)."""
    model = _llama()
    ids = _ids(200)
    pattern = "sink_window:sink_blocks=1,window_blocks=1"
    with patch_model(model, pattern=pattern, decode="sparse", decode_top_pages=2, decode_backend="reference",
                     decode_layers=[1]) as h:
        ref, _ = greedy_generate(model, ids, NEW, transformers.DynamicCache())  # sparse prefill, sparse decode...
        h.decode_route.exact = True  # ...made exact: the reference for this prefill
        ref, _ = greedy_generate(model, ids, NEW, transformers.DynamicCache())
        h.decode_route.exact = False
        before = dict(h.counts)
        r = speculative_generate(model, ids, NEW, draft_tokens=3, cache=transformers.DynamicCache())
    assert r.tokens == ref
    delta = {k: h.counts[k] - before[k] for k in h.counts}
    assert delta["prefill_sparse"] == 2 and delta["decode_sparse"] == r.drafted  # layer 1 only
    assert delta["decode_verify"] == r.rounds and delta["decode_dense"] == r.drafted + r.rounds  # layer 0: the model's


def test_eos_stops_after_the_first_eos_token():
    model = _llama()
    ids = _ids(200)
    ref, _ = greedy_generate(model, ids, NEW, dynamic_cache(model))
    p = 5
    eos = ref[p]
    first = ref.index(eos)
    with patch_model(model, decode="sparse", decode_top_pages=2, decode_backend="reference"):
        r = speculative_generate(model, ids, NEW, draft_tokens=3, eos_token_id=eos)
        assert r.tokens == ref[: first + 1]
        r2 = speculative_generate(model, ids, NEW, draft_tokens=3, eos_token_id=[96, ref[0]])
        assert r2.tokens == ref[:1] and r2.rounds == 0  # the prefill's token already ends it
        for bad in (True, -1, [], [1.5], "2"):
            with pytest.raises(ValueError, match=r"^speculative_generate: eos_token_id must be a token id or a "
                                                 r"non-empty list of them"):
                speculative_generate(model, ids, NEW, eos_token_id=bad)
