"""`sparseattn gen-check` end to end on a tiny random Llama (CPU, PyTorch reference decode)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.eval.gen_check import token_agreement  # noqa: E402
from sparseattn.testing.models import write_word_text  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (head_dim 64) with a byte-level tokenizer, saved with save_pretrained, and a text file."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    d = tmp_path_factory.mktemp("tiny_gen_check")
    model_dir = save_tiny_llama(d / "model", hidden_size=128, intermediate_size=128, heads=4, kv_heads=2,
                                head_dim=64)
    text = write_word_text(d / "text.txt", 1000)
    return model_dir, text


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == (0.75, 1)
    assert token_agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)


def test_gen_check_end_to_end(tiny, tmp_path, capsys):
    model_dir, text = tiny
    out = tmp_path / "gc"
    rc = main(["gen-check", "--model", str(model_dir), "--text-file", str(text), "--lengths", "120,200",
               "--new-tokens", "12", "--modes", "sparse_decode,kernel_decode,mixed_int8,mixed_fp8",
               "--top-pages", "1.0", "--mixed-window", "16", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "verdict: PASS" in cap.out
    rep = json.loads((out / "gen_check.json").read_text())
    assert rep["passed"] is True and rep["config"]["new_tokens"] == 12 and rep["config"]["lengths"] == [120, 200]
    assert len(rep["summary"]) == 8 and len(rep["rows"]) == 8
    by = {(r["mode"], r["length"]): r for r in rep["rows"]}
    for (mode, n), r in by.items():
        assert len(r["tokens"]) == len(r["dense_tokens"]) == 12
        # every page / the dense kernel: the same greedy tokens as the model's own decode (float32, tiny model)
        assert r["agreement"] == 1.0 and r["first_divergence"] is None, (mode, n)
        if mode.startswith("mixed_"):
            assert r["memory"]["bytes_saved"] > 0 and r["memory"]["quant"] == mode.split("_")[1]
        else:
            key = "decode_sparse" if mode == "sparse_decode" else "decode_kernel"
            assert r["counts"][key] == 2 * 11 and r["counts"]["decode_dense"] == 0  # 2 layers x 11 decode steps
            assert "text" in r and "dense_text" in r
    md = (out / "gen_check.md").read_text()
    assert "| sparse_decode | 120 | 100.0% |" in md and "overall **PASS**" in md


def test_gen_check_random_ids_few_pages_fails(tiny, tmp_path, capsys):
    """Two pages of a random model's 300-token cache: the greedy tokens diverge, the verdict is FAIL (exit 1)."""
    out = tmp_path / "gc"
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "300", "--new-tokens", "10",
               "--modes", "sparse_decode", "--top-pages", "2", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "[gen-check] length 300 sample 0: sparse_decode agreement" in cap.err  # progress on stderr
    rep = json.loads((out / "gen_check.json").read_text())
    s = rep["summary"][0]
    assert s["passed"] is False and s["agreement"] < 0.95 and s["first_divergence"] is not None
    assert "FAIL" in (out / "gen_check.md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--modes", "sparse_decode,turbo"], "unknown mode 'turbo'"),
    (["--top-pages", "0"], "--top-pages: is out of range"),
    (["--top-pages", "1.5"], "--top-pages: is out of range"),
    (["--lengths", "600"], "exceed the model's context"),
    (["--modes", "sparse_prefill"], "sparse_prefill without a sparse prefill"),
    (["--predictor", "nope:x=1"], "nope"),
    (["--new-tokens", "0"], "--new-tokens: must be a positive integer"),
    (["--token-budget", "0"], "--token-budget: must be a positive integer"),
    (["--token-budget", "64", "--top-pages", "0.5"], "not allowed with argument"),
    (["--mixed-sink-tokens", "-1"], "--mixed-sink-tokens: must be a non-negative integer"),
])
def test_gen_check_user_errors(tiny, tmp_path, capsys, argv, needle):
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "64", "--new-tokens", "4",
               "--quiet", "--out", str(tmp_path / "gc")] + argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_gen_check_short_source_fails_before_generating(tiny, tmp_path, capsys):
    """A text too short for the last length is refused before any length is generated (not after the first)."""
    model_dir, text = tiny
    rc = main(["gen-check", "--model", str(model_dir), "--text-file", str(text), "--lengths", "64,500",
               "--samples", "40", "--new-tokens", "4", "--modes", "kernel_decode", "--out", str(tmp_path / "gc")])
    err = capsys.readouterr().err
    assert rc == 2 and "too few tokens" in err, err
    assert "dense 4 tokens" not in err  # no generation ran


def test_gen_check_missing_text_dir(tiny, tmp_path, capsys):
    rc = main(["gen-check", "--model", str(tiny[0]), "--text-dir", str(tmp_path / "missing"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "does not exist" in err


def test_teacher_forced_and_token_budget(tiny, tmp_path, capsys):
    """A 32-key budget (2 pages of 16) on a random model: both metrics reported; the teacher-forced run sees the
    same inputs as the free run up to the first divergence, so their tokens agree up to and including it."""
    out = tmp_path / "gc"
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "300", "--new-tokens", "10",
               "--modes", "sparse_decode,kernel_decode", "--token-budget", "32", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    rep = json.loads((out / "gen_check.json").read_text())
    assert rep["config"]["top_pages"] == 2 and rep["config"]["token_budget"] == 32
    assert rep["config"]["teacher_forced"] is True
    by = {r["mode"]: r for r in rep["rows"]}
    sp, kd = by["sparse_decode"], by["kernel_decode"]
    assert kd["first_divergence"] is None and kd["tf_agreement"] == 1.0 and kd["tf_tokens"] == kd["tokens"]
    f = sp["first_divergence"]
    assert f is not None and sp["decode"]["top_pages"] == 2
    assert sp["tf_tokens"][:f + 1] == sp["tokens"][:f + 1]
    assert sp["tf_tokens"][f] != sp["dense_tokens"][f]
    expect = sum(a == b for a, b in zip(sp["tf_tokens"], sp["dense_tokens"])) / 10
    assert sp["tf_agreement"] == expect
    summ = {s["mode"]: s for s in rep["summary"]}
    assert summ["sparse_decode"]["tf_agreement"] == expect and summ["kernel_decode"]["tf_agreement"] == 1.0
    md = (out / "gen_check.md").read_text()
    assert "teacher-forced" in md and "token budget 32" in md
    # the mismatch bookkeeping: positions, dense's margins there, and kernel_decode's count as the floor
    miss = [i for i, (a, b) in enumerate(zip(sp["tf_tokens"], sp["dense_tokens"])) if a != b]
    assert sp["tf_mismatches"] == miss and f in miss and kd["tf_mismatches"] == []
    assert sp["tf_mismatch_margins"] == [sp["dense_margins"][i] for i in miss]
    assert len(sp["dense_margins"]) == 10 and all(m >= 0 for m in sp["dense_margins"])
    s_sp, s_kd = summ["sparse_decode"], summ["kernel_decode"]
    assert s_sp["tf_mismatches"] == len(miss) and s_sp["tf_steps"] == 10
    assert s_sp["floor_mode"] == "kernel_decode" and s_sp["floor_tf_mismatches"] == 0 == s_kd["tf_mismatches"]
    top = max(sp["tf_mismatch_margins"])
    assert s_sp["tf_mismatch_margin_max"] == top
    assert s_sp["dense_share_at_or_below"] == sum(m <= top for m in sp["dense_margins"]) / 10
    assert s_kd["tf_mismatch_margin_max"] is None and s_kd["dense_share_at_or_below"] is None
    assert f"| {len(miss)} of 10 (0) |" in md and "exact attention through our decode kernel" in md


def test_greedy_generate_forced(tiny):
    """Feeding a run's own tokens back as the forced tokens reproduces them exactly."""
    from sparseattn.eval.bench_model import load_model
    from sparseattn.eval.gen_check import _dynamic_cache, greedy_generate

    model, _ = load_model(str(tiny[0]), dtype=torch.float32, device="cpu", need_tokenizer=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    free, _ = greedy_generate(model, ids, 6, _dynamic_cache(model))
    forced, _ = greedy_generate(model, ids, 6, _dynamic_cache(model), forced=free)
    assert forced == free
    other = [(t + 1) % model.config.vocab_size for t in free]
    got, _ = greedy_generate(model, ids, 6, _dynamic_cache(model), forced=other)
    assert got[0] == free[0]  # the first token comes from the prompt alone
    # margins: each step's top-1 minus top-2 logit, recomputed here from a plain forward of the same tokens
    toks, _, margins = greedy_generate(model, ids, 6, _dynamic_cache(model), return_margins=True)
    assert toks == free and len(margins) == 6
    full = torch.cat([ids, torch.tensor([free[:-1]])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, ids.shape[1] - 1:].float()
    top2 = logits.topk(2, dim=-1).values
    assert torch.allclose(torch.tensor(margins), top2[:, 0] - top2[:, 1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"^greedy_generate: forced is too short; expected >= 5 tokens, got 2$"):
        greedy_generate(model, ids, 6, _dynamic_cache(model), forced=free[:2])


def test_gen_check_budget_errors(tiny):
    from sparseattn.eval.gen_check import run_gen_check

    with pytest.raises(ValueError, match=r"^gen_check: token_budget and top_pages are both given; expected one "):
        run_gen_check(str(tiny[0]), random_ids=True, lengths=[64], new_tokens=2, top_pages=0.5, token_budget=64)
    with pytest.raises(ValueError, match=r"^gen_check: token_budget must be a positive integer; .*got 0$"):
        run_gen_check(str(tiny[0]), random_ids=True, lengths=[64], new_tokens=2, token_budget=0)
    with pytest.raises(ValueError, match=r"^gen_check: teacher_forced must be a bool"):
        run_gen_check(str(tiny[0]), random_ids=True, lengths=[64], new_tokens=2, teacher_forced=1)
    with pytest.raises(ValueError, match=r"^gen_check: mixed_smooth_keys must be a bool; expected True or False, "
                                         r"got 'no'$"):
        run_gen_check(str(tiny[0]), random_ids=True, lengths=[64], new_tokens=2, mixed_smooth_keys="no")


def test_gen_check_mixed_sink_tokens(tiny, tmp_path, capsys):
    """--mixed-sink-tokens reaches the mixed cache (config, memory report) through run_gen_check."""
    from sparseattn.eval.gen_check import run_gen_check

    out = tmp_path / "gc"
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "64", "--new-tokens", "3",
               "--modes", "mixed_int8", "--mixed-window", "16", "--mixed-sink-tokens", "4", "--no-teacher-forced",
               "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc in (0, 1), cap.err
    rep = json.loads((out / "gen_check.json").read_text())
    assert rep["config"]["mixed_sink_tokens"] == 4
    mem = rep["rows"][0]["memory"]
    assert mem["sink_tokens_max"] == 4 and mem["sink_bytes"] > 0
    assert "sink tokens 4" in (out / "gen_check.md").read_text()
    with pytest.raises(ValueError, match=r"^gen_check: mixed_sink_tokens must be a non-negative integer; expected an "
                                         r"int >= 0 or None \(the cache's default\), got -2$"):
        run_gen_check(str(tiny[0]), random_ids=True, lengths=[64], new_tokens=2, mixed_sink_tokens=-2)


def test_gen_check_sparse_spec(tiny, tmp_path, capsys):
    """sparse_spec: plain sparse decode at 2 pages changes the tokens, its speculative use gives dense's tokens; the
    report says how many drafts were accepted, and no teacher-forced run is made for it."""
    out = tmp_path / "gc"
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "200", "--new-tokens", "10",
               "--modes", "sparse_decode,sparse_spec", "--top-pages", "2", "--draft-tokens", "3",
               "--decode-backend", "reference", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    rep = json.loads((out / "gen_check.json").read_text())
    by = {r["mode"]: r for r in rep["rows"]}
    sp, spec = by["sparse_decode"], by["sparse_spec"]
    assert sp["agreement"] < 1.0 and rc == 1 and "verdict: FAIL" in cap.out  # plain sparse decode misses
    assert spec["agreement"] == 1.0 and spec["tokens"] == spec["dense_tokens"] and spec["tf_agreement"] is None
    x = spec["speculative"]
    assert x["draft_tokens"] == 3 and 0 <= x["accepted"] < x["drafted"] and x["rounds"] >= 3
    assert spec["counts"]["decode_verify"] == 2 * x["rounds"] and spec["counts"]["decode_sparse"] == 2 * x["drafted"]
    summ = {s["mode"]: s for s in rep["summary"]}
    assert summ["sparse_spec"]["passed"] is True and summ["sparse_spec"]["speculative"]["drafted"] == x["drafted"]
    assert rep["config"]["draft_tokens"] == 3
    md = (out / "gen_check.md").read_text()
    assert f"- 200: {x['accepted']} of {x['drafted']} drafts accepted" in md


@pytest.mark.parametrize("value", ["0", "64"])
def test_gen_check_bad_draft_tokens(tiny, tmp_path, capsys, value):
    rc = main(["gen-check", "--model", str(tiny[0]), "--random-ids", "--lengths", "64", "--new-tokens", "2",
               "--modes", "sparse_spec", "--draft-tokens", value, "--quiet", "--out", str(tmp_path / "gc")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "draft-tokens" in err[0] or "draft_tokens" in err[0]
