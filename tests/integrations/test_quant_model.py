"""Quantized attention inside a real model: patch_model(quant=...), the CLI flags, captured-Q/K/V accuracy.

On the CPU the quantized kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
FP8 through its e4m3 emulation (docs/QUANT.md). Tiny random Llamas, head_dim 64 (the kernel takes 64/128/256).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.integrations import patch_model  # noqa: E402
from sparseattn.ops import quant as Q  # noqa: E402
from sparseattn.ops import triton_launch  # noqa: E402
from sparseattn.testing import tolerances as T  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PATTERN = "sink_window:window_blocks=2,block_m=64,block_n=64"
N = 200  # not a block multiple


def _llama(dtype=torch.bfloat16, layers: int = 2, head_dim: int = 64, heads: int = 2, kv_heads: int = 1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=head_dim, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval().to(device=DEV, dtype=dtype)


def _ids(n: int = N) -> torch.Tensor:
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(1)).to(DEV)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def model_and_ref():
    """A bf16 tiny Llama and its logits patched without quant (the bf16 Triton kernel, same layout)."""
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits.float()
        with patch_model(model, pattern=PATTERN, backend="triton"):
            ref = model(ids).logits.float()
    return model, ids, ref, dense


# ---------------------------------------------------------------- patch_model(quant=...)
@torch.no_grad()
@pytest.mark.parametrize("quant,gran", [("int8", "per_warp"), ("int8", "per_thread"), ("int8_fp8", "per_block")])
def test_quantized_model_close_to_unquantized_and_the_quant_kernel_ran(model_and_ref, monkeypatch, quant, gran):
    model, ids, ref, dense = model_and_ref
    calls = []
    real = Q._run_kernel

    def counting(qq, layout, causal, *a, **kw):
        calls.append((qq.quant, qq.granularity, layout.block_m, layout.block_n, causal))
        return real(qq, layout, causal, *a, **kw)

    def no_bf16(*a, **kw):
        raise AssertionError("the unquantized kernel ran")


    monkeypatch.setattr(Q, "_run_kernel", counting)
    monkeypatch.setattr(triton_launch, "block_sparse_fwd", no_bf16)
    # layer graphs off: on CUDA the graph capture would run the body once more (3 calls, not 2)
    with patch_model(model, pattern=PATTERN, quant=quant, quant_granularity=gran, layer_graphs=False) as h:
        out = model(ids).logits.float()
        rep = h.sparsity_report()
        assert h.quant == quant and h.quant_granularity == gran
        assert h.counts["prefill_quant"] == h.counts["prefill_sparse"] == 2
    assert calls == [(quant, gran, 64, 64, True)] * 2
    assert rep["quant"] == {"mode": quant, "granularity": gran}
    assert all(e["backends"] == [f"quant:{quant}:{gran}"] for e in rep["layers"].values())
    assert 0 < rep["mean_density"] < 1
    assert not torch.equal(out, ref)  # quantization changed the numbers (it ran)
    assert _rel(out, ref) <= T.QUANT_MODEL_LOGITS_REL_MAX[quant]
    assert _cos(out, ref) >= T.QUANT_MODEL_LOGITS_COS_MIN[quant]
    assert _rel(out, dense) > T.QUANT_MODEL_LOGITS_REL_MAX["int8"]  # the sparse layout was applied, not dense
    assert model.config._attn_implementation == "sdpa"  # unpatched exactly


@torch.no_grad()
def test_quantized_prefill_then_generate_and_graph_status(model_and_ref):
    model, ids, _, _ = model_and_ref
    with patch_model(model, pattern=PATTERN, quant="int8") as h:
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 3
        assert h.counts["prefill_quant"] == 2 and h.counts["decode_dense"] == 2 * 2
        # CPU: no layer graphs; on CUDA the quantized body is captured and replayed like the bf16 one
        assert h.layer_graph_status == ({} if DEV == "cpu" else {0: "graphed", 1: "graphed"})


def test_quantized_prefill_makes_no_host_reads():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if "_local_scalar_dense" in str(func):
                self.n += 1
            return func(*args, **(kwargs or {}))

    model = _llama(dtype=torch.float16)
    ids = _ids(256)
    with patch_model(model, predictor="mean_sim:cdf_threshold=0.97,keep_local=2", quant="int8_fp8") as h, \
            torch.no_grad():
        model(ids)  # first call: routes validated, caches filled
        counter = Count()
        with counter:
            model(ids)
        assert h.counts["prefill_quant"] == 4
    assert counter.n == 0


# ---------------------------------------------------------------- refusals (never a silent bf16 fallback)
def _unpatched(model) -> None:
    from sparseattn.integrations import get_handle

    assert get_handle(model) is None and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(quant="int4"), ValueError, r"^patch_model: quant is unknown; expected None or one of \['int8', 'int8_fp8'\], got 'int4'$"),
    (dict(quant="int8", quant_granularity="per_head"), ValueError, r"^patch_model: quant_granularity is unknown;"),
    (dict(quant="int8", backend="masked_sdpa"), ValueError, r"^patch_model: backend cannot run quant='int8'.*got 'masked_sdpa'$"),
    (dict(quant="int8", dense_above=0.5), ValueError, r"^patch_model: dense_above cannot be combined with quant='int8'"),
    (dict(quant="int8", pattern="sink_window:window_blocks=2,pv_threshold=5.0"), ValueError,
     r"^patch_model: predictor of layer 0 sets pv_threshold=5.0, which the quantized kernel does not implement"),
])
def test_bad_quant_arguments_are_refused_at_patch_time(model_and_ref, kwargs, err, match):
    model = model_and_ref[0]
    kw = {"pattern": PATTERN, **kwargs}
    with pytest.raises(err, match=match):
        patch_model(model, **kw)
    _unpatched(model)


def test_unsupported_models_are_refused_with_the_reason(monkeypatch):
    m32 = _llama(dtype=torch.float32)
    with pytest.raises(NotImplementedError, match=r"^patch_model: quant='int8' cannot run layer 0 of this model: dtype "
                                                  r"float32 is not supported.*; expected .*, got .*float32, head_dim 64$"):
        patch_model(m32, pattern=PATTERN, quant="int8")
    _unpatched(m32)
    m16 = _llama(head_dim=16)
    with pytest.raises(NotImplementedError, match=r"head_dim 16 is not supported by the quantized kernel"):
        patch_model(m16, pattern=PATTERN, quant="int8")
    _unpatched(m16)
    if DEV == "cpu":
        from sparseattn.ops import triton_launch

        mb = _llama()
        monkeypatch.setattr(triton_launch, "interpret_mode", lambda: False)
        with pytest.raises(NotImplementedError, match=r"q is on the CPU; the quantized kernel needs CUDA tensors \(or "
                                                      r"TRITON_INTERPRET=1"):
            patch_model(mb, pattern=PATTERN, quant="int8")
        _unpatched(mb)


def test_fp8_below_sm89_is_refused():
    assert "compute capability >= 8.9" in Q.gpu_refusal((8, 0), "int8_fp8", "cuda:0")
    assert Q.gpu_refusal((8, 0), "int8", "cuda:0") is None


@torch.no_grad()
def test_layout_blocks_and_windows_are_refused(model_and_ref):
    model, ids, _, _ = model_and_ref
    with patch_model(model, pattern="sink_window:window_blocks=2,block_m=32,block_n=32", quant="int8") as h:
        with pytest.raises(NotImplementedError, match=r"^patch_model: quant='int8' cannot run layer 0: its predictor's "
                                                      r"layout blocks 32x32 are not supported"):
            model(ids)
        assert h.counts["prefill_quant"] == 0
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, num_key_value_heads=1, head_dim=64, sliding_window=48,
                                        layer_types=["sliding_attention", "full_attention"],
                                        max_position_embeddings=512)
    gemma = transformers.Gemma3ForCausalLM(cfg).eval().to(device=DEV, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"cannot run sliding-window layers \[0\]: the quantized kernel has no "
                                                  r"window support; expected those layers in dense_layers \(dense_layers=\[0\]\)"):
        patch_model(gemma, pattern=PATTERN, quant="int8")
    with patch_model(gemma, pattern=PATTERN, quant="int8", dense_layers=[0]) as h:  # the window layer kept dense
        gemma(_ids(150))
        assert h.counts["prefill_quant"] == 1 and h.counts["prefill_dense"] == 1


@torch.no_grad()
def test_evaluate_records_quant(model_and_ref):
    from sparseattn.eval.end_to_end import evaluate

    model, ids, _, _ = model_and_ref
    res = evaluate(model=model, input_ids=[ids.cpu()], pattern=PATTERN, gen_tokens=2, score_last=64,
                   self_check=False, timing_repeats=0, progress=False, quant="int8", quant_granularity="per_thread")
    assert res.config["quant"] == "int8" and res.config["quant_granularity"] == "per_thread"
    assert all(r.get("backends") == ["quant:int8:per_thread"] for r in res.layers.values())
    cos = res.summary["logits_cosine"]["mean"]
    assert T.QUANT_TINY_MODEL_COS_MIN < cos < 1.0
    assert "quantized attention: int8 (per_thread" in res.to_markdown()
    with pytest.raises(ValueError, match="pv_threshold"):
        evaluate(model=model, input_ids=[ids.cpu()], pattern="sink_window:window_blocks=2,pv_threshold=3.0",
                 gen_tokens=0, self_check=False, timing_repeats=0, progress=False, quant="int8")


# ---------------------------------------------------------------- CLI
def _rc(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code)


@pytest.mark.parametrize("cmd", ["eval", "bench-model"])
@pytest.mark.parametrize("extra,msg", [
    (["--quant", "int4"], "invalid choice: 'int4'"),
    (["--quant", "int8", "--quant-gran", "per_head"], "invalid choice: 'per_head'"),
    (["--quant-gran", "per_warp"], "--quant-gran has no effect without --quant"),
    (["--quant", "int8", "--backend", "masked_sdpa"], "--backend cannot run --quant int8"),
    (["--quant", "int8", "--dtype", "float32", "--device", "cpu"], "dtype float32 is not supported"),
])
def test_cli_quant_flags_reject_bad_values_with_exit_2(capsys, cmd, extra, msg):
    argv = [cmd, "--model", "/nonexistent/model-never-loaded"] + extra
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    # a CUDA machine without the interpreter refuses --device cpu before it looks at the dtype
    cpu_first = "--device" in extra and torch.cuda.is_available() and not triton_launch.interpret_mode()
    assert msg in err or (cpu_first and "q is on the CPU" in err), err
    if "invalid choice" not in msg:
        assert len(err.strip().splitlines()) == 1, err


def test_cli_quant_flags_parse():
    import argparse

    from sparseattn.cli import bench_model, eval_cmd

    for mod in (eval_cmd, bench_model):
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="command")
        mod.add_parser(sub)
        name = "eval" if mod is eval_cmd else "bench-model"
        a = p.parse_args([name, "--quant", "int8_fp8", "--quant-gran", "per_thread"])
        assert (a.quant, a.quant_gran) == ("int8_fp8", "per_thread")
        a = p.parse_args([name])
        assert (a.quant, a.quant_gran) == (None, None)


def test_bench_model_quant_rows(tmp_path, capsys):
    out = tmp_path / "bm"
    rc = _rc(["bench-model", "--arch", "smollm2-135m", "--layers", "1", "--lengths", "128", "--random-ids",
              "--patterns", "sink_window:window_blocks=1", "--predictors", "", "--quant", "int8",
              "--repeats", "1", "--warmup", "1", "--no-profile", "--no-plot", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "bench_model.json").read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["all blocks", "all blocks [int8 per_warp]", "pattern sink_window:window_blocks=1",
                      "pattern sink_window:window_blocks=1 [int8 per_warp]"]
    for r in res["rows"]:
        quant = r["label"].endswith("[int8 per_warp]")
        assert r["quant"] == ("int8" if quant else None)
        assert (r["layer_calls"]["prefill_quant"] > 0) == quant
        assert r["backends"] == (["quant:int8:per_warp"] if quant else ["masked_sdpa"] if DEV == "cpu" else ["triton"])
        assert r["vs_dense"]["logits_cosine"] > T.QUANT_TINY_MODEL_COS_MIN
    q_all = res["rows"][1]
    assert q_all["vs_all_blocks"]["logits_cosine"] < 1.0  # compared with the bf16 floor, not with itself
    assert any("quantized kernel" in n for n in res["notes"])


# ---------------------------------------------------------------- captured Q/K/V accuracy
@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """`sparseattn collect` on a 2-layer random Llama with head_dim 64 (byte-level tokenizer), 128 tokens."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    d = tmp_path_factory.mktemp("quant_qkv")
    model_dir = save_tiny_llama(d / "model", hidden_size=128, intermediate_size=64, heads=2, kv_heads=1,
                                head_dim=64)
    text = d / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Seven wizards quietly box jumping frogs. " * 40)
    root = d / "qkv"
    rc = main(["collect", "--model", str(model_dir), "--text-file", str(text), "--lengths", "128", "--samples", "1",
               "--layers", "0,1", "--quiet", "--out", str(root)])
    assert rc == 0
    return root


def test_captured_qkv_accuracy(collection):
    from sparseattn.eval.quant_accuracy import captured_quant_accuracy, quant_accuracy_table

    res = captured_quant_accuracy(collection, modes=("int8", "int8_fp8"), granularities=("per_warp", "per_thread"))
    rows = res["rows"]
    assert len(rows) == 2 * (1 + 2 * 2)  # 2 layers x (bf16 + 2 modes x 2 granularities)
    assert {r["layer"] for r in rows} == {0, 1} and {r["seq_len"] for r in rows} == {128}
    bf16 = {r["layer"]: r for r in rows if r["method"] == "bf16"}
    for r in rows:
        assert T.QUANT_TINY_MODEL_COS_MIN < r["cos"] <= 1.0 + T.FP64_ATOL and 0 < r["rel_l1"] < T.QUANT_QKV_REL_L1_MAX
        if r["method"] != "bf16":
            assert r["passed"] is (r["cos"] >= T.QUANT_INT8_COS_MIN and r["rel_l1"] <= T.QUANT_INT8_REL_L1_MAX)
            assert r["rel_l1"] > bf16[r["layer"]]["rel_l1"]  # quantization costs more than bf16 rounding: it ran
    assert res["summary"]["int8 per_warp"]["n"] == 2
    assert res["passed"] == all(r["passed"] for r in rows if r["passed"] is not None)
    md = quant_accuracy_table(res)
    assert "| int8 per_warp | 2 |" in md
    # one length folder, one file and a predicted layout give the same numbers for the same tensors
    one = captured_quant_accuracy(collection / "len128" / "sample0.safetensors", modes=("int8",), layers=[1])
    same = [r for r in rows if r["layer"] == 1 and r["method"] == "int8" and r["granularity"] == "per_warp"][0]
    assert one["rows"][1]["cos"] == pytest.approx(same["cos"], abs=T.FP64_ATOL)
    sparse = captured_quant_accuracy(collection / "len128", modes=("int8",), layers=[0],
                                     predictor="pattern:name=sink_window,sink_blocks=0,window_blocks=1,block_m=64,block_n=64")
    assert sparse["rows"][0]["density"] < 1.0
    with pytest.raises(ValueError, match=r"^captured_quant_accuracy: modes has an unknown mode"):
        captured_quant_accuracy(collection, modes=("int4",))
    with pytest.raises(ValueError, match=r"select nothing"):
        captured_quant_accuracy(collection, layers=[7])
    with pytest.raises(ValueError, match=r"^captured_quant_accuracy: backend is unknown"):
        captured_quant_accuracy(collection, backend="numpy")
    with pytest.raises(ValueError, match=r"^captured_quant_accuracy: smooth_q must be a non-empty sequence of bools"):
        captured_quant_accuracy(collection, smooth_q=())


def test_captured_qkv_accuracy_emulation_and_smooth_q(collection):
    """The emulation backend gives the kernel's numbers (same scales and rounding); smooth_q=(True, False) adds a
    labelled row per quantized configuration."""
    from sparseattn.eval.quant_accuracy import captured_quant_accuracy, quant_accuracy_table

    kw = dict(modes=("int8",), granularities=("per_warp", "per_token"), smooth_q=(True, False))
    kern = captured_quant_accuracy(collection, **kw)
    emu = captured_quant_accuracy(collection, backend="emulation", **kw)
    assert emu["backend"] == "emulation" and kern["backend"] == "kernel"
    assert len(kern["rows"]) == len(emu["rows"]) == 2 * (1 + 2 * 2)
    for a, b in zip(kern["rows"], emu["rows"]):
        assert (a["layer"], a["method"], a["granularity"], a["smooth_q"]) == (b["layer"], b["method"], b["granularity"],
                                                                              b["smooth_q"])
        # up to the output's rounding: the interpreter's bf16 cast truncates, the emulation rounds to nearest
        # (one bf16 ulp, 2**-8 relative, at most)
        assert a["rel_l1"] == pytest.approx(b["rel_l1"], abs=2 ** -8)
    assert set(kern["summary"]) == {"bf16", "int8 per_warp", "int8 per_warp no_smooth_q", "int8 per_token",
                                    "int8 per_token no_smooth_q"}
    assert "per_warp no_smooth_q" in quant_accuracy_table(kern)


def test_bench_quant_qkv_option(collection, tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_quant.py")
    spec = importlib.util.spec_from_file_location("bench_quant_qkv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    smoke = ["--cpu-smoke"] if DEV == "cpu" else []
    rc = mod.main(["--qkv", str(collection), "--qkv-modes", "int8", "--qkv-layers", "1", "--out", str(tmp_path)] + smoke)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "quant_qkv.json").read_text())
    assert [(r["layer"], r["method"]) for r in res["rows"]] == [(1, "bf16"), (1, "int8")]
    assert (tmp_path / "quant_qkv.md").read_text().startswith("Quantized attention vs fp32 attention")
    rc = mod.main(["--qkv", str(tmp_path / "missing"), "--out", str(tmp_path)] + smoke)
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    # the emulation at real lengths on a CPU, with and without Q smoothing
    rc = mod.main(["--qkv", str(collection), "--qkv-modes", "int8", "--qkv-layers", "0", "--qkv-emulate",
                   "--qkv-smooth-q", "both", "--out", str(tmp_path / "emu")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "emu" / "quant_qkv.json").read_text())
    assert res["backend"] == "emulation"
    assert [(r["method"], r["smooth_q"]) for r in res["rows"]] == [("bf16", None), ("int8", True), ("int8", False)]
    assert "per_warp no_smooth_q" in (tmp_path / "emu" / "quant_qkv.md").read_text()


def test_bench_model_script_takes_the_quant_flags(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_model.py")
    spec = importlib.util.spec_from_file_location("bench_model_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "/nonexistent/model", "--quant", "int8", "--backend", "reference"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_model.py: error: bench-model: --backend cannot run --quant int8") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        mod.main(["--quant", "fp4"])
    assert exc.value.code == 2


def test_quant_model_emulated_script(tmp_path, capsys):
    """benchmarks/quant_model_emulated.py: every attention layer of a tiny Llama through the quantized emulation."""
    pytest.importorskip("transformers")
    from sparseattn.testing.bad_inputs import save_tiny_llama

    import transformers

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=128, intermediate_size=64, heads=2, kv_heads=1,
                                head_dim=64)
    # sharper attention than a random init gives (its scores are all near 0), so quantizing Q/K shows in the logits
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    m.save_pretrained(str(model_dir))
    texts = tmp_path / "texts"
    texts.mkdir()
    g = torch.Generator().manual_seed(3)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    (texts / "a.txt").write_text(" ".join(words[int(j)] for j in torch.randint(0, len(words), (400,), generator=g)))
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "quant_model_emulated.py")
    spec = importlib.util.spec_from_file_location("quant_model_emulated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    rc = mod.main(["--model", str(model_dir), "--text-dir", str(texts), "--seq-len", "96", "--positions", "32",
                   "--configs", "int8/per_warp,int8/per_warp/no_smooth_q/no_balance", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "quant_model.json").read_text())
    assert list(res["rows"]) == ["bf16", "int8/per_warp", "int8/per_warp/no_smooth_q/no_balance"]
    for row in res["rows"].values():
        assert row["positions"] == 32 and 0.0 <= row["top1"] <= 1.0 and row["kl"] >= 0.0
    # quantization changes the logits more than bf16 rounding alone (the rows really ran the emulation)
    assert res["rows"]["int8/per_warp/no_smooth_q/no_balance"]["kl"] > res["rows"]["bf16"]["kl"]
    assert "| int8/per_warp |" in capsys.readouterr().out
    assert res["predictor"] is None and all(r["block_density"] == 1.0 for r in res["rows"].values())
    # --predictor: a sparse layout in every layer, the sparsity alone as its own row, the quantized rows on it
    rc = mod.main(["--model", str(model_dir), "--text-dir", str(texts), "--seq-len", "256", "--positions", "32",
                   "--configs", "int8/per_warp", "--predictor",
                   "static:pattern=sink_window,window_blocks=1,sink_blocks=1,block_m=64,block_n=64",
                   "--out", str(out / "sparse")])
    assert rc == 0, capsys.readouterr().err
    sp = json.loads((out / "sparse" / "quant_model.json").read_text())
    assert list(sp["rows"]) == ["bf16", "sparse_bf16", "int8/per_warp"]
    # 4 query blocks of 64: a causal block row keeps the sink and the diagonal, so 7 of the 10 causal blocks
    assert sp["rows"]["bf16"]["block_density"] == 1.0
    assert sp["rows"]["sparse_bf16"]["block_density"] == pytest.approx(0.7)
    assert sp["rows"]["int8/per_warp"]["block_density"] == pytest.approx(0.7)
    # skipping blocks costs more than bf16 rounding (the layout really reached the attention)
    assert sp["rows"]["sparse_bf16"]["kl"] > sp["rows"]["bf16"]["kl"]
    assert "| sparse_bf16 | 0.700 |" in capsys.readouterr().out
    assert mod.main(["--predictor", "nope:x=1", "--out", str(out)]) == 2
    assert "not a registered predictor" in capsys.readouterr().err
    assert mod.main(["--configs", "int4/per_warp", "--out", str(out)]) == 2
    assert "not mode/granularity" in capsys.readouterr().err
    assert mod.main(["--configs", "int8/per_warp/no_balance/no_balance", "--out", str(out)]) == 2
    assert "not mode/granularity" in capsys.readouterr().err
