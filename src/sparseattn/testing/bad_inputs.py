"""A table of bad inputs across the public API, the file loaders and the command line.

Each :class:`Case` is one *class* of bad input (wrong rank, truncated GGUF, unknown spec key,
``--seq-len 0`` ...) with the call that tries it. :func:`run_cases` runs them all (offline, CPU
only, in a temporary folder) and records, for each, the exception type and its message — or,
for command-line cases, the exit status and what was printed on stderr. :func:`check` says
whether a result is what the project promises:

* API / file cases: a ``ValueError`` in the project's format
  ``<function>: <argument> <problem>; expected <X>, got <Y>`` — or, where the case says so, a
  ``NotImplementedError`` naming each backend's reason — and never a raw ``TypeError``,
  ``KeyError``, ``struct.error``, ``AttributeError`` ... from deep inside.
* CLI cases: exit status 2 and exactly one line on stderr (``sparseattn <cmd>: error: ...``),
  no traceback.

``python -m sparseattn.testing.bad_inputs --out docs/BAD_INPUTS.md`` (or
``benchmarks/bad_inputs.py``) writes the table; ``tests/test_bad_inputs.py`` runs every case.
Cases needing ``transformers`` (a tiny model folder built on the fly, never downloaded) are
reported as skipped without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import struct
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Case", "CASES", "Fixtures", "run_case", "run_cases", "check", "markdown", "PROJECT_FORMAT", "main"]

#: the project's error format (first line of the message)
PROJECT_FORMAT = re.compile(r"^\S+: .+; expected .+, got .+")
#: a dispatcher's refusal: ``attention: backend='triton' cannot run these inputs (triton: ...; reference: ...)``
REFUSAL_FORMAT = re.compile(r"^\S+: .+ \(.+: .+\)$")
#: one line a CLI prints on a user error
CLI_LINE = re.compile(r"^sparseattn( \S+)?: error: .+")
#: exception types that mean an input reached code that did not check it
RAW_TYPES = ("TypeError", "KeyError", "IndexError", "AttributeError", "error", "SafetensorError", "JSONDecodeError",
             "UnicodeDecodeError", "RuntimeError", "OSError", "AssertionError", "ZeroDivisionError", "OverflowError")


def byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (``<s>``, ``</s>``, ``<unk>`` + 256 byte symbols), for tiny
    test models saved with ``save_pretrained``; needs ``transformers`` and ``tokenizers``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def save_tiny_llama(directory: Path, *, hidden_size: int, intermediate_size: int, heads: int, kv_heads: int,
                    head_dim: int, layers: int = 2, max_positions: int = 512) -> Path:
    """Save a random Llama (seed 0) with :func:`byte_level_tokenizer` to ``directory`` (``save_pretrained``) and
    return it: the small local model the CLI tests and the bad-input table load."""
    import transformers

    fast = byte_level_tokenizer()
    fast.save_pretrained(str(directory))
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=head_dim, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with _quiet_transformers():
        transformers.LlamaForCausalLM(cfg).save_pretrained(str(directory))
    return directory


@dataclass
class Case:
    """One bad-input class.

    Attributes:
        cls: what is wrong, in words.
        call: the call (Python) or command line (CLI) that tries it, as shown in the table.
        run: ``run(fixtures)`` makes the call (API) or returns the argv (CLI).
        kind: ``"api"`` (the public Python API), ``"file"`` (a loader reading a bad file) or ``"cli"``.
        expect: ``"ValueError"`` or ``"NotImplementedError"`` (API/file); CLI cases expect exit 2.
        needs: ``"transformers"`` when the case builds a tiny model folder.
        contains: a piece of text the error must contain (it names what is wrong).
    """

    cls: str
    call: str
    run: Callable[["Fixtures"], Any]
    kind: str = "api"
    expect: str = "ValueError"
    needs: str = ""
    contains: str = ""


@dataclass
class Fixtures:
    """Inputs the cases share, built lazily inside ``root`` (a temporary folder)."""

    root: Path
    _cache: dict[str, Any] = field(default_factory=dict)

    # --- tensors
    def qkv(self, n: int = 64, heads: int = 4, kv_heads: int = 2, d: int = 16, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, n, d, generator=g).to(dtype)
        k = torch.randn(1, kv_heads, n, d, generator=g).to(dtype)
        v = torch.randn(1, kv_heads, n, d, generator=g).to(dtype)
        return q, k, v

    def layout(self, n: int = 64, block: int = 32, heads: int = 4):
        from sparseattn.layout.patterns import random_layout

        return random_layout(n, density=0.5, block_m=block, block_n=block, heads=heads, causal=True)

    # --- files
    def path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write(self, name: str, data: bytes | str) -> Path:
        p = self.path(name)
        if isinstance(data, str):
            p.write_text(data)
        else:
            p.write_bytes(data)
        return p

    def gguf_bytes(self) -> bytes:
        """A small, valid GGUF v3 file (one metadata string, one F32 tensor), written by hand."""
        if "gguf" not in self._cache:
            def s(x: str) -> bytes:
                b = x.encode()
                return struct.pack("<Q", len(b)) + b

            kv = s("general.architecture") + struct.pack("<I", 8) + s("llama")  # type 8 = string
            info = s("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0)
            head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
            head += b"\0" * (-len(head) % 32)  # default alignment 32
            self._cache["gguf"] = head + struct.pack("<32f", *range(32))
        return self._cache["gguf"]

    def sample(self, name: str, *, n: int = 64, tensors: dict[str, torch.Tensor] | None = None,
               meta: Any = "default", raw_tensors: bytes | None = None, raw_meta: str | None = None) -> Path:
        """A ``<name>/len<n>/sample0.safetensors`` (+ ``.json``) collection, optionally broken."""
        from safetensors.torch import save_file

        d = self.root / name / f"len{n}"
        d.mkdir(parents=True, exist_ok=True)
        st = d / "sample0.safetensors"
        if raw_tensors is not None:
            st.write_bytes(raw_tensors)
        else:
            if tensors is None:
                q, k, v = self.qkv(n)
                tensors = {"layer0.q": q, "layer0.k": k, "layer0.v": v}
            save_file(tensors, str(st))
        if raw_meta is not None:
            (d / "sample0.json").write_text(raw_meta)
        elif meta == "default":
            (d / "sample0.json").write_text(json.dumps(self.meta(n)))
        elif meta is not None:
            (d / "sample0.json").write_text(json.dumps(meta))
        return self.root / name

    @staticmethod
    def meta(n: int = 64, **changes: Any) -> dict[str, Any]:
        m = {"model": "tiny", "sample": 0, "seq_len": n, "layers": [0], "heads": 4, "kv_heads": 2, "head_dim": 16,
             "batch": 1, "dtype": "float32", "scale": {"0": 0.25}}
        m.update(changes)
        return m

    def valid_st_bytes(self) -> bytes:
        p = self.sample("valid")
        return (p / "len64" / "sample0.safetensors").read_bytes()

    def text_file(self, chars: int) -> Path:
        return self.write(f"text_{chars}.txt", ("The quick brown fox jumps over the lazy dog. " * (chars // 45 + 1))[:chars])

    def tiny_model(self) -> Path:
        """A 2-layer Llama (max_position_embeddings=128) with a byte-level tokenizer, saved locally."""
        if "model" not in self._cache:
            self._cache["model"] = save_tiny_llama(self.root / "tiny_model", hidden_size=32, intermediate_size=64,
                                                   heads=4, kv_heads=2, head_dim=8, max_positions=128)
        return self._cache["model"]


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    tl = transformers.utils.logging
    on = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if on:
            tl.enable_progress_bar()


# --------------------------------------------------------------------------- the cases
def _api_cases() -> list[Case]:
    import sparseattn as sa

    def att(**kw: Any) -> Callable[[Fixtures], Any]:
        def run(fx: Fixtures) -> Any:
            q, k, v = fx.qkv()
            args = {"q": q, "k": k, "v": v}
            args.update({key: (val(fx) if callable(val) else val) for key, val in kw.items()})
            return sa.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
        return run

    def layout_with(fn: Callable[[Any], tuple[Any, Any]]) -> Callable[[Fixtures], Any]:
        def run(fx: Fixtures) -> Any:
            lay = fx.layout(128)
            num, idx = fn(lay)
            return sa.BlockLayout(num, idx, 32, 32, 128, 128)
        return run

    def oob(lay: Any) -> tuple[Any, Any]:
        idx = lay.kv_indices.clone()
        idx[0, 0, 0, 0] = 99
        return lay.kv_num_blocks, idx

    def not_ascending(lay: Any) -> tuple[Any, Any]:
        num = torch.full_like(lay.kv_num_blocks, 2)
        idx = torch.zeros_like(lay.kv_indices)
        idx[..., 0] = 1
        return num, idx

    def state(fx: Fixtures, n: int = 64) -> Any:
        q, k, v = fx.qkv(n)
        return sa.attention(q, k, v)

    f16 = torch.float16
    return [
        Case("q of the wrong rank (3-D)", "attention(q[0], k, v)", lambda fx: sa.attention(fx.qkv()[0][0], *fx.qkv()[1:])),
        Case("q is not a tensor", "attention([1.0], k, v)", att(q=[1.0])),
        Case("head counts not divisible (H % H_kv != 0)", "attention(q with H=3, k/v with H_kv=2)",
             lambda fx: sa.attention(fx.qkv(heads=3)[0], *fx.qkv()[1:])),
        Case("dtype mismatch q/k", "attention(q float32, k/v float64)",
             lambda fx: sa.attention(fx.qkv()[0], fx.qkv()[1].double(), fx.qkv()[2].double())),
        Case("integer tensors", "attention(q.int(), k.int(), v.int())",
             lambda fx: sa.attention(*(t.int() for t in fx.qkv()))),
        Case("empty tensors (N=0)", "attention(q[:, :, :0], k, v)", lambda fx: sa.attention(fx.qkv()[0][:, :, :0], *fx.qkv()[1:])),
        Case("v shape differs from k", "attention(q, k, v[:, :, :32])", lambda fx: sa.attention(*fx.qkv()[:2], fx.qkv()[2][:, :, :32])),
        Case("head_dim unsupported by the forced backend (D=48, backend='triton')",
             "attention(q/k/v fp16 D=48, backend='triton')",
             lambda fx: sa.attention(*fx.qkv(d=48, dtype=f16), backend="triton"), expect="NotImplementedError"),
        Case("forced Triton on CPU float32 tensors", "attention(q, k, v, backend='triton')  # CPU float32",
             att(backend="triton"), expect="NotImplementedError"),
        Case("unknown backend", "attention(q, k, v, backend='cuda')", att(backend="cuda")),
        Case("scale <= 0", "attention(q, k, v, scale=0)", att(scale=0)),
        Case("NaN scale", "attention(q, k, v, scale=float('nan'))", att(scale=float("nan"))),
        Case("causal not a bool", "attention(q, k, v, causal=1)", att(causal=1)),
        Case("layout built for other lengths", "attention(q/k/v N=64, layout=random_layout(128))",
             att(layout=lambda fx: fx.layout(128))),
        Case("layout is not a BlockLayout", "attention(q, k, v, layout=torch.ones(3))", att(layout=torch.ones(3))),
        Case("layout block size does not match its tensors", "BlockLayout(num/idx of block 32, block_m=64, ...)",
             lambda fx: sa.BlockLayout(fx.layout(128).kv_num_blocks, fx.layout(128).kv_indices, 64, 32, 128, 128)),
        Case("layout index out of range", "BlockLayout(kv_indices[0,0,0,0]=99, ...)", layout_with(oob)),
        Case("layout indices not ascending", "BlockLayout(rows [1, 0], ...)", layout_with(not_ascending)),
        Case("dense tail negative", "lay.with_dense_tail(-1)", lambda fx: fx.layout(64).with_dense_tail(-1),
             contains="rows"),
        Case("pv_threshold negative", "attention(q, k, v, layout=lay, pv_threshold=-1)",
             att(layout=lambda fx: fx.layout(64), pv_threshold=-1)),
        Case("pv_threshold NaN", "attention(q, k, v, layout=lay, pv_threshold=nan)",
             att(layout=lambda fx: fx.layout(64), pv_threshold=float("nan"))),
        Case("pv_threshold without a layout", "attention(q, k, v, pv_threshold=1.0)", att(pv_threshold=1.0)),
        Case("sliding_window zero", "attention(q, k, v, causal=True, sliding_window=0)",
             att(causal=True, sliding_window=0), contains="sliding_window"),
        Case("sliding_window a bool", "attention(q, k, v, causal=True, sliding_window=True)",
             att(causal=True, sliding_window=True), contains="sliding_window"),
        Case("sliding_window a float", "attention(q, k, v, causal=True, sliding_window=16.0)",
             att(causal=True, sliding_window=16.0), contains="sliding_window"),
        Case("sliding_window without causal", "attention(q, k, v, sliding_window=16)",
             att(sliding_window=16), contains="causal=True"),
        Case("band layout window negative", "sliding_window_band_layout(64, window=-1)",
             lambda fx: sa.sliding_window_band_layout(64, window=-1), contains="window"),
        Case("cu_seqlens not starting at 0", "attention(q, k, v, causal=True, cu_seqlens=[1, 64])",
             att(causal=True, cu_seqlens=[1, 64]), contains="must start at 0"),
        Case("cu_seqlens not increasing", "attention(q, k, v, causal=True, cu_seqlens=[0, 40, 30, 64])",
             att(causal=True, cu_seqlens=[0, 40, 30, 64]), contains="strictly increasing"),
        Case("cu_seqlens not ending at N_kv", "attention(q, k, v, causal=True, cu_seqlens=[0, 32, 63])",
             att(causal=True, cu_seqlens=[0, 32, 63]), contains="must end at the key length"),
        Case("cu_seqlens and document_ids together",
             "attention(q, k, v, causal=True, cu_seqlens=[0, 64], document_ids=torch.zeros(64, dtype=torch.long))",
             att(causal=True, cu_seqlens=[0, 64], document_ids=torch.zeros(64, dtype=torch.long)),
             contains="mutually exclusive"),
        Case("document_ids of floats", "attention(q, k, v, causal=True, document_ids=torch.zeros(64))",
             att(causal=True, document_ids=torch.zeros(64)), contains="integers"),
        Case("prefix_len past the keys", "attention(q, k, v, causal=True, prefix_len=65)",
             att(causal=True, prefix_len=65), contains="prefix_len"),
        Case("prefix_len without causal", "attention(q, k, v, prefix_len=8)", att(prefix_len=8),
             contains="causal=True"),
        Case("prefix_len with sliding_window", "attention(q, k, v, causal=True, prefix_len=8, sliding_window=4)",
             att(causal=True, prefix_len=8, sliding_window=4), contains="sliding_window"),
        Case("merge_states with mismatched shapes", "merge_states([state(N=64), state(N=32)])",
             lambda fx: sa.merge_states([state(fx, 64), state(fx, 32)])),
        Case("merge_states with an empty list", "merge_states([])", lambda fx: sa.merge_states([])),
        Case("merge_states with non-tensors", "merge_states([(1, 2)])", lambda fx: sa.merge_states([(1, 2)])),
    ]


def _predictor_cases() -> list[Case]:
    from sparseattn.integrations.transformers_patch import pattern_predictor, resolve_predictor
    from sparseattn.predictors import config_from_json, make_predictor, parse_predictor_spec
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig

    return [
        Case("unknown predictor name", "parse_predictor_spec('nope')", lambda fx: parse_predictor_spec("nope")),
        Case("unknown predictor key", "parse_predictor_spec('mean_sim:cdf=0.9')",
             lambda fx: parse_predictor_spec("mean_sim:cdf=0.9"), contains="key 'cdf' is not a parameter of mean_sim"),
        Case("unknown predictor keyword (Python API)", "make_predictor('oracle', top_k=0.1)",
             lambda fx: make_predictor("oracle", top_k=0.1)),
        Case("bad value for a key", "parse_predictor_spec('mean_sim:cdf_threshold=2')",
             lambda fx: parse_predictor_spec("mean_sim:cdf_threshold=2")),
        Case("wrong-typed value for a key", "parse_predictor_spec('sketch_walk:beta=abc')",
             lambda fx: parse_predictor_spec("sketch_walk:beta=abc")),
        Case("spec item that is not key=value", "parse_predictor_spec('mean_sim:cdf_threshold')",
             lambda fx: parse_predictor_spec("mean_sim:cdf_threshold")),
        Case("key given twice", "parse_predictor_spec('mean_sim:topk=0.1,topk=0.2')",
             lambda fx: parse_predictor_spec("mean_sim:topk=0.1,topk=0.2")),
        Case("static pattern spec with an unknown key", "pattern_predictor('sink_window:window=8')",
             lambda fx: pattern_predictor("sink_window:window=8")),
        Case("static pattern spec with a bad value", "pattern_predictor('sink_window:window_blocks=-1')",
             lambda fx: pattern_predictor("sink_window:window_blocks=-1")),
        Case("static pattern spec via resolve_predictor with an unknown key", "resolve_predictor('pattern:name=local,foo=1')",
             lambda fx: resolve_predictor("pattern:name=local,foo=1")),
        Case("config JSON of the wrong type (a list)", "config_from_json('[1, 2]', MeanSimilarityConfig)",
             lambda fx: config_from_json("[1, 2]", MeanSimilarityConfig)),
        Case("config JSON with an unknown key", "config_from_json('{\"cdf\": 0.9}', MeanSimilarityConfig)",
             lambda fx: config_from_json('{"cdf": 0.9}', MeanSimilarityConfig)),
        Case("config JSON truncated", "config_from_json('{\"topk\": 0.', MeanSimilarityConfig)",
             lambda fx: config_from_json('{"topk": 0.', MeanSimilarityConfig)),
        Case("config JSON of another config type", "config_from_json('{\"type\": \"OracleConfig\"}', MeanSimilarityConfig)",
             lambda fx: config_from_json('{"type": "OracleConfig"}', MeanSimilarityConfig)),
    ]


def _file_cases() -> list[Case]:
    from sparseattn.eval.collect import iter_collected
    from sparseattn.eval.compare import safetensors_inputs
    from sparseattn.models.loader import check_gguf, load

    def it(path_fn: Callable[[Fixtures], Path]) -> Callable[[Fixtures], Any]:
        return lambda fx: list(iter_collected(path_fn(fx)))

    def q(fx: Fixtures, **kw: Any) -> torch.Tensor:
        return fx.qkv(**kw)[0]

    return [
        Case("truncated GGUF", "load('model.gguf')  # first half of a valid GGUF", kind="file",
             contains="is not a readable GGUF file",
             run=lambda fx: load(fx.write("trunc.gguf", fx.gguf_bytes()[: len(fx.gguf_bytes()) // 2]))),
        Case("GGUF truncated inside the header", "load('short.gguf')  # 12 bytes", kind="file",
             run=lambda fx: load(fx.write("short.gguf", fx.gguf_bytes()[:12]))),
        Case("GGUF with its tensor data cut off", "check_gguf('cut.gguf')  # last 8 bytes missing", kind="file",
             run=lambda fx: check_gguf(fx.write("cut.gguf", fx.gguf_bytes()[:-8]))),
        Case("empty GGUF", "load('empty.gguf')", kind="file", run=lambda fx: load(fx.write("empty.gguf", b""))),
        Case("random bytes as GGUF", "load('random.gguf')", kind="file",
             run=lambda fx: load(fx.write("random.gguf", bytes(range(256)) * 4))),
        Case("missing model file", "load('missing.gguf')", kind="file", run=lambda fx: load(fx.root / "missing.gguf")),
        Case("model folder without config.json", "load('<empty folder>')", kind="file",
             run=lambda fx: load(fx.path("empty_model/x").parent)),
        Case("model file that is not GGUF", "load('weights.bin')", kind="file",
             run=lambda fx: load(fx.write("weights.bin", b"\x80\x02}q\x00."))),
        Case("missing collection path", "iter_collected('missing/')", kind="file", run=it(lambda fx: fx.root / "missing")),
        Case("folder without .safetensors", "iter_collected('<folder of .txt>')", kind="file",
             run=it(lambda fx: fx.write("no_st/a.txt", "x").parent)),
        Case("empty safetensors file", "iter_collected('len64/sample0.safetensors')  # 0 bytes", kind="file",
             run=it(lambda fx: fx.sample("st_empty", raw_tensors=b""))),
        Case("truncated safetensors file", "iter_collected(collection)  # tensor file cut in half", kind="file",
             run=it(lambda fx: fx.sample("st_trunc", raw_tensors=fx.valid_st_bytes()[: len(fx.valid_st_bytes()) // 2]))),
        Case("random bytes as safetensors", "iter_collected(collection)  # 1 KiB of noise", kind="file",
             run=it(lambda fx: fx.sample("st_rand", raw_tensors=bytes(range(256)) * 4))),
        Case("tensor missing from a safetensors file", "iter_collected(collection)  # no layer0.k", kind="file",
             run=it(lambda fx: fx.sample("st_missing", tensors={"layer0.q": q(fx), "layer0.v": fx.qkv()[2]}))),
        Case("tensor of the wrong rank", "iter_collected(collection)  # layer0.q is 3-D", kind="file",
             run=it(lambda fx: fx.sample("st_rank", tensors={"layer0.q": q(fx)[0], "layer0.k": fx.qkv()[1],
                                                               "layer0.v": fx.qkv()[2]}))),
        Case("tensor of the wrong dtype", "iter_collected(collection)  # layer0.k is int32", kind="file",
             run=it(lambda fx: fx.sample("st_dtype", tensors={"layer0.q": q(fx), "layer0.k": fx.qkv()[1].int(),
                                                                "layer0.v": fx.qkv()[2]}))),
        Case("tensors of mismatched shapes", "iter_collected(collection)  # k has head_dim 8, q 16", kind="file",
             run=it(lambda fx: fx.sample("st_shape", tensors={"layer0.q": q(fx), "layer0.k": fx.qkv(d=8)[1],
                                                                "layer0.v": fx.qkv(d=8)[2]}))),
        Case("metadata JSON of the wrong type (a list)", "iter_collected(collection)  # sample0.json = [1, 2]",
             kind="file", run=it(lambda fx: fx.sample("meta_list", meta=[1, 2]))),
        Case("metadata with a missing key", "iter_collected(collection)  # sample0.json without seq_len", kind="file",
             run=it(lambda fx: fx.sample("meta_missing", meta={k: v for k, v in fx.meta().items() if k != "seq_len"}))),
        Case("metadata value of the wrong type", "iter_collected(collection)  # \"seq_len\": \"64\"", kind="file",
             run=it(lambda fx: fx.sample("meta_type", meta=fx.meta(seq_len="64")))),
        Case("NaN in metadata numbers", "iter_collected(collection)  # \"scale\": {\"0\": NaN}", kind="file",
             run=it(lambda fx: fx.sample("meta_nan", meta=fx.meta(scale={"0": math.nan})))),
        Case("truncated metadata JSON", "iter_collected(collection)  # sample0.json cut mid-object", kind="file",
             run=it(lambda fx: fx.sample("meta_trunc", raw_meta=json.dumps(fx.meta())[:40]))),
        Case("empty metadata file", "iter_collected(collection)  # sample0.json is 0 bytes", kind="file",
             run=it(lambda fx: fx.sample("meta_empty", raw_meta=""))),
        Case("metadata path is a directory", "iter_collected(collection)  # sample0.json/ is a folder", kind="file",
             run=it(lambda fx: (fx.sample("meta_dir", meta=None) / "len64" / "sample0.json").mkdir(exist_ok=True)
                    or fx.root / "meta_dir")),
        Case("metadata that disagrees with the tensors", "iter_collected(collection)  # \"heads\": 8 for 4-head q",
             kind="file", run=it(lambda fx: fx.sample("meta_disagree", meta=fx.meta(heads=8)))),
        Case("safetensors file without Q/K tensors", "safetensors_inputs('other.safetensors')", kind="file",
             run=lambda fx: list(safetensors_inputs(_save(fx, "other.safetensors", {"weight": torch.zeros(2, 3)})))),
    ]


def _save(fx: Fixtures, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    p = fx.path(name)
    save_file(tensors, str(p))
    return p


def _cli_cases() -> list[Case]:
    def cli(cls: str, argv: Callable[[Fixtures], list[str]], shown: str, needs: str = "", contains: str = "") -> Case:
        return Case(cls, shown, argv, kind="cli", expect="exit 2", needs=needs, contains=contains)

    def out(fx: Fixtures) -> str:
        return str(fx.root / "cli_out")

    return [
        cli("unknown flag of a subcommand", lambda fx: ["quick-test", "--bogus"], "sparseattn quick-test --bogus"),
        cli("unknown subcommand", lambda fx: ["evaluate"], "sparseattn evaluate"),
        cli("--seq-len 0", lambda fx: ["quick-test", "--seq-len", "0"], "sparseattn quick-test --seq-len 0"),
        cli("--seq-len not a number", lambda fx: ["eval", "--seq-len", "1k"], "sparseattn eval --seq-len 1k"),
        cli("--density out of range", lambda fx: ["quick-test", "--density", "0"], "sparseattn quick-test --density 0"),
        cli("--device that does not exist here", lambda fx: ["compare", "--a", "mean_sim", "--device", "cuda:99"],
            "sparseattn compare --a mean_sim --device cuda:99"),
        cli("--kv-heads not dividing --heads", lambda fx: ["quick-test", "--heads", "8", "--kv-heads", "3", "--seq-len", "64"],
            "sparseattn quick-test --heads 8 --kv-heads 3"),
        cli("--pattern unknown", lambda fx: ["quick-test", "--pattern", "diagonal", "--seq-len", "64"],
            "sparseattn quick-test --pattern diagonal"),
        cli("bad comma list (--depths out of [0, 1])", lambda fx: ["niah", "--depths", "0.5,1.5"],
            "sparseattn niah --depths 0.5,1.5"),
        cli("bad comma list (--lengths not integers)", lambda fx: ["collect", "--lengths", "512,abc"],
            "sparseattn collect --lengths 512,abc"),
        cli("bad comma list (--dense-tails negative)", lambda fx: ["ruler", "--dense-tails", "0,-64"],
            "sparseattn ruler --dense-tails 0,-64"),
        cli("missing --text-dir", lambda fx: ["eval", "--text-dir", str(fx.root / "no_texts"), "--out", out(fx)],
            "sparseattn eval --text-dir missing/"),
        cli("--text-file that matches nothing", lambda fx: ["collect", "--text-file", str(fx.root / "none*.txt")],
            "sparseattn collect --text-file 'none*.txt'"),
        cli("--predictor with an unknown key", lambda fx: ["compare", "--a", "mean_sim:cdf=0.9", "--out", out(fx)],
            "sparseattn compare --a mean_sim:cdf=0.9", contains="key 'cdf' is not a parameter of mean_sim"),
        cli("--predictor with an unknown key (eval, before the model loads)",
            lambda fx: ["eval", "--model", str(fx.root / "missing.gguf"), "--predictor", "sketch_walk:walks=2",
                        "--out", out(fx)],
            "sparseattn eval --predictor sketch_walk:walks=2", contains="key 'walks'"),
        cli("--pattern spec with an unknown key (refused before the model loads)",
            lambda fx: ["eval", "--model", str(fx.root / "missing.gguf"), "--pattern", "sink_window:window=4",
                        "--out", out(fx), "--quiet"],
            "sparseattn eval --model missing.gguf --pattern sink_window:window=4", contains="key 'window'"),
        cli("--model pointing to a missing file", lambda fx: ["eval", "--model", str(fx.root / "missing.gguf"), "--out", out(fx)],
            "sparseattn eval --model missing.gguf"),
        cli("--model pointing to a truncated GGUF",
            lambda fx: ["eval", "--model", str(fx.write("cli_trunc.gguf", fx.gguf_bytes()[:100])), "--out", out(fx)],
            "sparseattn eval --model truncated.gguf", contains="is not a readable GGUF file"),
        cli("--seq-len beyond the model's context", lambda fx: ["eval", "--model", str(fx.tiny_model()), "--seq-len", "200",
                                                                "--samples", "1", "--gen-tokens", "0", "--text-file",
                                                                str(fx.text_file(2000)), "--out", out(fx), "--quiet"],
            "sparseattn eval --model tiny/ (context 128) --seq-len 200", needs="transformers",
            contains="max_position_embeddings"),
        cli("text too short for the samples", lambda fx: ["eval", "--model", str(fx.tiny_model()), "--seq-len", "100",
                                                          "--samples", "2", "--text-file", str(fx.text_file(150)),
                                                          "--out", out(fx), "--quiet"],
            "sparseattn eval --model tiny/ --seq-len 100 --samples 2 --text-file short.txt", needs="transformers",
            contains="too few tokens"),
        cli("compare --input a collection with a corrupt file",
            lambda fx: ["compare", "--a", "mean_sim", "--input", str(fx.sample("cli_corrupt", raw_tensors=b"\0" * 64)),
                        "--out", out(fx)],
            "sparseattn compare --a mean_sim --input collection/  # len64/sample0.safetensors corrupt"),
        cli("compare --input that does not exist", lambda fx: ["compare", "--a", "mean_sim", "--input", "structred"],
            "sparseattn compare --a mean_sim --input structred"),
        cli("validate on metadata with a missing key",
            lambda fx: ["validate", str(fx.sample("cli_meta", meta={"seq_len": 64})), "--quiet"],
            "sparseattn validate collection/  # sample0.json lacks layers, heads, ..."),
        cli("validate --lengths selecting nothing", lambda fx: ["validate", str(fx.sample("cli_ok")), "--lengths", "4096",
                                                                "--quiet", "--predictor", "static:block_m=32,block_n=32"],
            "sparseattn validate collection/ --lengths 4096"),
        cli("--backend triton on CPU tensors", lambda fx: ["validate", str(fx.sample("cli_ok")), "--backend", "triton",
                                                          "--device", "cpu", "--quiet",
                                                          "--predictor", "static:block_m=32,block_n=32"],
            "sparseattn validate collection/ --backend triton --device cpu"),
    ]


def all_cases() -> list[Case]:
    """Every case, API first, then predictors/specs, files and the CLI."""
    return _api_cases() + _predictor_cases() + _file_cases() + _cli_cases()


CASES: list[Case] = []  # filled on first use (importing sparseattn pieces lazily)


def _cases() -> list[Case]:
    if not CASES:
        CASES.extend(all_cases())
    return CASES


# --------------------------------------------------------------------------- running
def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``sparseattn.cli.main.main(argv)`` in-process; returns ``(status, stdout, stderr)``."""
    from sparseattn.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # pragma: no cover - main returns instead
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is a finding, printed as the CLI would
            traceback.print_exc()
            rc = 1
    return rc, out.getvalue(), err.getvalue()


def run_case(case: Case, fx: Fixtures) -> dict[str, Any]:
    """Run one case; returns a JSON-friendly record (see :func:`check` for the verdict)."""
    rec: dict[str, Any] = {"class": case.cls, "call": case.call, "kind": case.kind, "expect": case.expect,
                           "contains": case.contains}
    if case.needs and not _have(case.needs):
        rec.update(skipped=f"needs {case.needs}")
        return rec
    if case.kind == "cli":
        try:
            argv = case.run(fx)
        except Exception as exc:  # noqa: BLE001 - fixture failure is recorded
            rec.update(skipped=f"fixture failed: {type(exc).__name__}: {exc}")
            return rec
        rc, out, err = run_cli(argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        rec.update(argv=argv, status=rc, stderr_lines=len(lines), stderr=err, stdout_tail=out[-500:],
                   error=lines[0] if len(lines) == 1 else err.strip())
        return rec
    try:
        case.run(fx)
    except Exception as exc:  # noqa: BLE001 - recording what escaped is the point
        msg = str(exc)
        rec.update(error_type=type(exc).__name__, error_module=type(exc).__module__,
                   error=msg.splitlines()[0] if msg else "", lines=len(msg.splitlines()))
    else:
        rec.update(error_type=None, error="(no error raised)")
    return rec


def check(rec: dict[str, Any]) -> list[str]:
    """Problems with a record (empty list: the input was refused the way the project promises)."""
    if "skipped" in rec:
        return []
    problems = []
    if rec["kind"] == "cli":
        if rec["status"] != 2:
            problems.append(f"exit status {rec['status']}, expected 2")
        if rec["stderr_lines"] != 1:
            problems.append(f"{rec['stderr_lines']} lines on stderr, expected 1")
        if "Traceback" in rec["stderr"] or "Traceback" in rec["stdout_tail"]:
            problems.append("a traceback was printed")
        if rec.get("contains") and rec["contains"] not in rec["error"]:
            problems.append(f"the message does not say {rec['contains']!r}")
        if rec["stderr_lines"] == 1 and not CLI_LINE.match(rec["error"]):
            problems.append(f"stderr line not 'sparseattn <cmd>: error: ...': {rec['error'][:120]!r}")
        return problems
    typ = rec["error_type"]
    if typ is None:
        return ["no error was raised"]
    if typ != rec["expect"]:
        problems.append(f"raised {typ}, expected {rec['expect']}")
    if typ in RAW_TYPES:
        problems.append(f"a raw {typ} escaped")
    if rec.get("contains") and rec["contains"] not in rec["error"]:
        problems.append(f"the message does not say {rec['contains']!r}")
    fmt = REFUSAL_FORMAT if rec["expect"] == "NotImplementedError" else PROJECT_FORMAT
    if not fmt.match(rec["error"]):
        problems.append("message not in the project's format '<function>: <argument> <problem>; expected X, got Y'")
    return problems


def run_cases(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Run every case (in ``root`` or a temporary folder); returns the records in table order."""
    import warnings

    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparseattn-bad-inputs-"))
        fx = Fixtures(Path(root))
        recs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a warning is not an error; the records are about errors
            for case in _cases():
                rec = run_case(case, fx)
                rec["problems"] = check(rec)
                recs.append(rec)
        return recs


def _md_cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _scrub(text: str, root: str) -> str:
    return text.replace(root + os.sep, "").replace(root, ".")


def markdown(recs: list[dict[str, Any]], root: str = "") -> str:
    """The ``docs/BAD_INPUTS.md`` table."""
    n_ok = sum(1 for r in recs if not r["problems"] and "skipped" not in r)
    n_skip = sum(1 for r in recs if "skipped" in r)
    kinds = {k: sum(1 for r in recs if r["kind"] == k) for k in ("api", "file", "cli")}
    lines = [
        "# Bad inputs: what each one raises",
        "",
        "Generated by `python benchmarks/bad_inputs.py` (the cases live in `sparseattn.testing.bad_inputs`; "
        "`tests/test_bad_inputs.py` runs every one). Offline and CPU only: the GGUF, safetensors and JSON files are "
        "written on the fly, and the model cases use a 2-layer Llama built locally (context 128), never a download.",
        "",
        f"{len(recs)} bad-input classes ({kinds['api']} public API and predictor specs, {kinds['file']} files, "
        f"{kinds['cli']} command line): {n_ok} refused as promised"
        + (f", {n_skip} skipped (missing optional package)" if n_skip else "")
        + (f", **{len(recs) - n_ok - n_skip} not**" if len(recs) - n_ok - n_skip else "") + ".",
        "",
        "The promise: the Python API and the loaders raise `ValueError` in the project's format "
        "`<function>: <argument> <problem>; expected X, got Y` (an unsupported but valid combination raises "
        "`NotImplementedError` naming each backend's reason); never a raw `TypeError`, `KeyError`, `struct.error`, "
        "`SafetensorError` or `JSONDecodeError`. The command line prints one line, `sparseattn <cmd>: error: ...`, "
        "on stderr and exits with status 2 (`sparseattn --debug <cmd> ...` shows the traceback). Paths below are "
        "relative to the temporary folder of the run.",
        "",
        "| # | class | call | error |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(recs, 1):
        if "skipped" in r:
            err = f"skipped ({r['skipped']})"
        elif r["kind"] == "cli":
            err = f"exit {r['status']}; stderr: `{_md_cell(_scrub(r['error'], root))}`"
        else:
            err = f"{r['error_type']}: `{_md_cell(_scrub(r['error'], root))}`"
        if r["problems"]:
            err += " — **" + "; ".join(r["problems"]) + "**"
        lines.append(f"| {i} | {_md_cell(r['class'])} | `{_md_cell(r['call'])}` | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run every bad-input case and write the markdown table.")
    ap.add_argument("--out", default="docs/BAD_INPUTS.md", help="markdown file to write (default docs/BAD_INPUTS.md)")
    ap.add_argument("--json", default=None, help="also write the records as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparseattn-bad-inputs-") as tmp:
        recs = run_cases(tmp)
        text = markdown(recs, root=tmp)
        if args.json:
            Path(args.json).write_text(json.dumps([{k: _scrub(v, tmp) if isinstance(v, str) else v for k, v in r.items()}
                                                   for r in recs], indent=1, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    bad = [(i, r) for i, r in enumerate(recs, 1) if r["problems"]]
    print(f"{len(recs)} cases, {len(bad)} with problems; wrote {args.out}")
    for i, r in bad:
        print(f"  #{i} {r['class']}: {'; '.join(r['problems'])}: {r.get('error', '')[:200]}")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
