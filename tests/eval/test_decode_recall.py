"""Attention-mass recall of sparse decode's page selection (sparseattn.eval.decode_recall) and the GQA semantics of
the Quest bound (per query head, max over the group — not a pooled query). CPU, float32/float64, tiny inputs."""

from __future__ import annotations

import pytest
import torch

from sparseattn.eval.decode_recall import mass_recall, oracle_pages, page_mass
from sparseattn.ops.pages import page_summaries, select_pages
from sparseattn.testing.tolerances import PAGE_MASS_FP64_ATOL, SHARP_PAGE_RECALL_MIN

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _brute_mass(q, k, ps, scale):
    B, H, Lq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = H // Hkv
    P = -(-N // ps)
    out = torch.zeros(B, Hkv, G, Lq, P, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                lim = N - Lq + i + 1
                p = torch.softmax(scale * k[b, h // G, :lim].double() @ q[b, h, i].double(), 0)
                for j in range(lim):
                    out[b, h // G, h % G, i, j // ps] += p[j]
    return out


@pytest.mark.parametrize("Lq", [1, 3])
def test_page_mass_and_recall(Lq):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, N, D, ps = 2, 6, 2, 45, 16, 8
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    m = page_mass(q, k, ps, scale=0.3)
    want = _brute_mass(q, k, ps, 0.3)
    tol = PAGE_MASS_FP64_ATOL
    assert m.shape == (B, Hkv, H // Hkv, Lq, 6) and torch.allclose(m, want, atol=tol, rtol=0)
    P = m.shape[-1]
    every = torch.arange(P).expand(B, Hkv, P)
    assert torch.allclose(mass_recall(m, every, torch.full((B, Hkv), P)), torch.ones(B, Hkv, H // Hkv, Lq, dtype=torch.float64),
                          atol=tol)
    # a selection's recall is the sum of its pages' mass; padding beyond the counts is ignored
    idx = torch.tensor([[[0, 5, 2], [1, 3, 4]]] * B)
    cnt = torch.tensor([[2, 3]] * B)
    r = mass_recall(m, idx, cnt)
    assert torch.allclose(r[:, 0], m[:, 0, ..., [0, 5]].sum(-1), atol=tol)
    assert torch.allclose(r[:, 1], m[:, 1, ..., [1, 3, 4]].sum(-1), atol=tol)
    # the oracle is the best shared selection at its size (forced pages included): at least Quest's group sum
    for top in (2, 3, 4):
        pidx, pnum = select_pages(q, page_summaries(k, ps), top_pages=top, backend="reference")
        oidx, onum = oracle_pages(m, top)
        assert torch.equal(onum, pnum.long())
        assert {0, P - 1} <= set(oidx[0, 0].tolist())
        assert (mass_recall(m, oidx, onum).sum((2, 3)) >= mass_recall(m, pidx, pnum).sum((2, 3)) - tol).all()


def test_page_mass_bad_shapes():
    with pytest.raises(ValueError, match=r"^page_mass: q/k have incompatible shapes; expected "):
        page_mass(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 10, 8), 4)
    with pytest.raises(ValueError, match=r"^page_mass: page_size must be a positive integer; expected an int > 0, got 0$"):
        page_mass(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 10, 8), 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gqa_bound_is_per_query_head(backend):
    """Two query heads of one KV head look at opposite directions. Pooling them (a mean query) would cancel to 0 and
    rank every page equal; the Quest bound per query head, maxed over the group, keeps both heads' pages."""
    D, ps, P = 64, 4, 8  # head_dim 64: the Triton scoring kernel runs it (interpreter on the CPU)
    e = torch.zeros(D)
    e[0] = 1.0
    k = torch.zeros(1, 1, P * ps, D)
    k[0, 0, 2 * ps:3 * ps] = 5 * e  # page 2: what head 0 attends
    k[0, 0, 5 * ps:6 * ps] = -5 * e  # page 5: what head 1 attends
    k[0, 0, :, 1] = torch.linspace(-0.1, 0.1, P * ps)  # small noise elsewhere
    q = torch.stack([e, -e]).view(1, 2, 1, D)  # G = 2
    pidx, pnum = select_pages(q, page_summaries(k, ps), top_pages=4, keep_first=1, keep_last=1, backend=backend)
    assert int(pnum[0, 0]) == 4
    assert set(pidx[0, 0, :4].tolist()) == {0, 2, 5, P - 1}
    m = page_mass(q, k, ps, scale=10.0)  # sharp: each head's mass sits on its page
    assert float(mass_recall(m, pidx, pnum).min()) > SHARP_PAGE_RECALL_MIN


def test_measure_mass_recall_tiny_model():
    transformers = pytest.importorskip("transformers")
    from sparseattn.eval.decode_recall import measure_mass_recall

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    rows = measure_mass_recall(model, ids, steps=(1, 3), budgets=(1.0, 3, 0.25), page_size=16, backend="reference")
    assert [r["budget"] for r in rows] == [1.0, 3, 0.25]
    full, three, quarter = rows
    assert full["pages"] == 10 and three["pages"] == 3 and quarter["pages"] == 3  # ceil(0.25 * 10)
    assert full["quest_min"] > 1 - 1e-9 and full["oracle_min"] > 1 - 1e-9
    for r in (three, quarter):
        assert 0 < r["quest_recall"] < 1 and r["oracle_recall"] >= r["quest_recall"] - 1e-9
        assert sorted(r["quest_by_layer"]) == [0, 1] and r["steps"] == [1, 3]
