"""Compare the sm_90 PTX of the attention kernels at a git revision with the working tree (no GPU needed).

Compiles ``_block_sparse_fwd_kernel``, ``_block_sparse_fwd_quant_kernel`` and the decode kernel
``_decode_split_kernel`` (configs named ``decode ...``) for a set of constexpr
configurations with the installed Triton (``triton.compile`` of an ``ASTSource`` for
``GPUTarget("cuda", 90, 64)``; Triton's bundled ``ptxas`` is used only for its final stage) once from
the sources at ``--before`` and once from the working tree, each in its own process, and prints one row
per configuration: ``identical`` (the PTX text is the same once comments and debug/line info are
dropped), ``same multiset`` (the same instructions in another order; register names are numbered per
kernel by first use, so a moved instruction renames none of the others), or the opcode counts that differ.

The argument signature mimics a real launch: every pointer and every stride divisible by 16 carries the
``tt.divisibility=16`` attribute the JIT would give it, a stride of 1 is specialised to the constant 1
(as the JIT does), and the ``do_not_specialize`` arguments stay plain ``i32``.

Usage::

    python benchmarks/ptx_compare.py b809532            # all configurations
    python benchmarks/ptx_compare.py HEAD~1 --only causal --show-diff

``--resources`` also prints each side's ``REG / STACK / SHARED / LOCAL`` from Triton's bundled ``cuobjdump``
(a stack under a register cap means spills) and ``LOOP:n``, the instruction count of the kernel's largest SASS loop
with its most frequent opcodes (per thread and iteration: one K/V tile in the decode kernel).

Exit status 0 whether or not the PTX differs (it is a report); 2 when a compile fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (kernel, constexpr overrides, options). Kernel "fwd": the bf16/fp16 kernel; "quant": the INT8 one.
_BASE = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, LAYOUT_BM=128, LAYOUT_BN=128, CAUSAL=True, PV_SKIP=False,
             LIST_CHUNK=64)
_OPT = dict(num_warps=8, num_stages=2, maxnreg=128)
_DEC_OPT = dict(num_warps=4, num_stages=3, maxnreg=None)
CONFIGS: dict[str, tuple[str, dict, dict, str]] = {
    "causal d128 bf16": ("fwd", {}, {}, "bf16"),
    "non-causal d128 bf16": ("fwd", {"CAUSAL": False}, {}, "bf16"),
    "causal d128 fp16": ("fwd", {}, {}, "fp16"),
    "causal d64 bf16 (128x128 tiles)": ("fwd", {"HEAD_DIM": 64, "BLOCK_N": 128}, {}, "bf16"),
    "causal d256 bf16 (no maxnreg)": ("fwd", {"HEAD_DIM": 256}, {"maxnreg": None}, "bf16"),
    "causal no PREFETCH": ("fwd", {"PREFETCH": False}, {}, "bf16"),
    "causal binary-search split": ("fwd", {"VEC_COUNT": False}, {}, "bf16"),
    "causal TMA": ("fwd", {"USE_TMA": True}, {}, "bf16"),
    "causal TMA+TMA_QO, no PREFETCH": ("fwd", {"USE_TMA": True, "TMA_QO": True, "PREFETCH": False}, {}, "bf16"),
    "non-causal TMA": ("fwd", {"USE_TMA": True, "CAUSAL": False}, {}, "bf16"),
    "causal RESCALE_TAU=8": ("fwd", {"RESCALE_TAU": 8.0}, {}, "bf16"),
    "non-causal RESCALE_TAU=8 TMA": ("fwd", {"RESCALE_TAU": 8.0, "CAUSAL": False, "USE_TMA": True}, {}, "bf16"),
    "causal PV_SKIP (128x128)": ("fwd", {"PV_SKIP": True, "BLOCK_N": 128}, {"maxnreg": None}, "bf16"),
    "non-causal PV_SKIP (64x64)": ("fwd", {"PV_SKIP": True, "CAUSAL": False, "BLOCK_M": 64, "BLOCK_N": 64,
                                           "LAYOUT_BM": 64, "LAYOUT_BN": 64}, {"num_warps": 4, "maxnreg": None}, "bf16"),
    "causal window": ("fwd", {"HAS_WINDOW": True}, {}, "bf16"),
    "causal window TMA": ("fwd", {"HAS_WINDOW": True, "USE_TMA": True}, {}, "bf16"),
    "causal row bounds": ("fwd", {"HAS_ROW_BOUNDS": True}, {}, "bf16"),
    "non-causal row bounds": ("fwd", {"HAS_ROW_BOUNDS": True, "CAUSAL": False}, {}, "bf16"),
    "causal float mask": ("fwd", {"HAS_FLOAT_MASK": True}, {}, "bf16"),
    "non-causal float mask RESCALE_TAU=8": ("fwd", {"HAS_FLOAT_MASK": True, "CAUSAL": False, "RESCALE_TAU": 8.0}, {},
                                            "bf16"),
    "causal KV scales int8": ("fwd", {"HAS_KV_SCALE": True}, {}, "bf16"),
    "causal state": ("fwd", {"HAS_STATE": True}, {}, "bf16"),
    "quant int8 causal d128": ("quant", {}, {"maxnreg": None}, "bf16"),
    "quant int8 non-causal d64 per-thread": ("quant", {"HEAD_DIM": 64, "CAUSAL": False, "K_SCALAR": False,
                                                       "KW": 64, "KT": 4, "KS": 2, "QW": 16, "QT": 8},
                                             {"maxnreg": None}, "bf16"),
    "quant int8_fp8 causal d128": ("quant", {"PV_FP8": True}, {"maxnreg": None}, "bf16"),
    # the autotuned int8 launch (128x64, 8 warps, maxnreg 128) without and with Q smoothing's per-key bias
    "quant int8 causal d128 maxnreg128": ("quant", {}, {}, "bf16"),
    "quant int8 causal d128 maxnreg128 KBIAS": ("quant", {"HAS_KBIAS": True}, {}, "bf16"),
    "quant int8 causal d128 maxnreg128 KBIAS TMA": ("quant", {"HAS_KBIAS": True, "USE_TMA": True}, {}, "bf16"),
    # the split-KV decode kernel (one query token, GQA group of 4 in a 16-row tile), default tile of ops/decode.py
    "decode bf16 d128 split": ("decode", {}, _DEC_OPT, "bf16"),
    "decode int8 KV scales d128 split": ("decode", {"HAS_KV_SCALE": True}, _DEC_OPT, "bf16"),
    "decode int8 KV scales q8 / fp16 P, paged": ("decode", {"HAS_KV_SCALE": True, "QK_MODE": 1, "PV_MODE": 1,
                                                            "PAGED": True, "PAGE": 16}, _DEC_OPT, "bf16"),
    # the tuned defaults of ops/tuned/decode.json (H200, D=128, row tile <= 16, not paged): bf16 and the int8 cache
    "decode bf16 d128 tuned (128 keys, 2 stages)": ("decode", {"BLOCK_N": 128}, {**_DEC_OPT, "num_stages": 2}, "bf16"),
    "decode int8 d128 tuned (fp16 K by byte moves, 128 keys, 3 stages)": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 3, "FAST_I8": True, "BLOCK_N": 128}, _DEC_OPT, "bf16"),
    # the same with FULL_TILES: whole tiles in an unmasked loop, the rest masked
    "decode bf16 d128 tuned FULL_TILES": ("decode", {"BLOCK_N": 128, "FULL_TILES": True},
                                          {**_DEC_OPT, "num_stages": 2}, "bf16"),
    "decode int8 d128 tuned FULL_TILES": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 3, "FAST_I8": True, "BLOCK_N": 128, "FULL_TILES": True}, _DEC_OPT,
        "bf16"),
    # keys-contiguous V (the V_KEYS walk: whole tiles unmasked, then the partial tile), bf16 and the int8 config
    "decode bf16 d128 tuned V_KEYS": ("decode", {"BLOCK_N": 128, "V_KEYS": True}, {**_DEC_OPT, "num_stages": 2}, "bf16"),
    "decode int8 d128 tuned V_KEYS": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 3, "FAST_I8": True, "BLOCK_N": 128, "V_KEYS": True}, _DEC_OPT, "bf16"),
    # tile-blocked V ((B, H_kv, N / 128, D, 128)): the V_KEYS walk with V_STEP = D
    "decode bf16 d128 tuned tile-blocked V": ("decode", {"BLOCK_N": 128, "V_KEYS": True, "V_STEP": 128},
                                              {**_DEC_OPT, "num_stages": 2}, "bf16"),
    "decode int8 d128 tuned tile-blocked V": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 3, "FAST_I8": True, "BLOCK_N": 128, "V_KEYS": True, "V_STEP": 128},
        _DEC_OPT, "bf16"),
    # PV="fp16w": V read as int32 words, converted to fp16 in registers (plain layout), with QK fp16 / q8x2
    "decode int8 d128 fp16w FULL_TILES": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 3, "PV_MODE": 4, "FAST_I8": True, "BLOCK_N": 128,
                   "FULL_TILES": True}, _DEC_OPT, "bf16"),
    "decode int8 d128 q8x2 fp16w FULL_TILES": (
        "decode", {"HAS_KV_SCALE": True, "QK_MODE": 2, "PV_MODE": 4, "FAST_I8": True, "BLOCK_N": 128,
                   "FULL_TILES": True}, _DEC_OPT, "bf16"),
}

# example argument values of a launch: B=2, H=8 (GQA 4), N=4096, D from the config, contiguous tensors
_N, _H, _HKV, _B = 4096, 8, 2, 2


def _fwd_args(c: dict, dt: str) -> dict:
    D = c["HEAD_DIM"]
    kv = "*i8" if c.get("HAS_KV_SCALE") else f"*{dt}"
    nb = _N // c["LAYOUT_BN"]
    mb = _N // c["LAYOUT_BM"]
    return {
        "Q": f"*{dt}", "K": kv, "V": kv, "Out": f"*{dt}", "Lse": "*fp32", "KvNum": "*i32", "KvIdx": "*i32",
        "Stats": "*i32" if c.get("PV_SKIP") else "*fp32",
        "Mask": "*fp32", "SmIn": "*fp32", "SlIn": "*fp32", "SaccIn": "*fp32", "SmOut": "*fp32", "SlOut": "*fp32",
        "SaccOut": "*fp32", "KScale": "*fp32", "VScale": "*fp32",
        "RowLo": "*i32" if c.get("HAS_ROW_BOUNDS") else "*fp32", "RowHi": "*i32" if c.get("HAS_ROW_BOUNDS") else "*fp32",
        "stride_qb": _H * _N * D, "stride_qh": _N * D, "stride_qm": D,
        "stride_kb": _HKV * _N * D, "stride_kh": _N * D, "stride_kn": D,
        "stride_vb": _HKV * _N * D, "stride_vh": _N * D, "stride_vn": D,
        "stride_ob": _H * _N * D, "stride_oh": _N * D, "stride_om": D,
        "stride_lb": _H * _N, "stride_lh": _N,
        "stride_nb": _H * mb, "stride_nh": mb, "stride_nm": 1,
        "stride_ib": _H * mb * nb, "stride_ih": mb * nb, "stride_im": nb, "stride_in": 1,
        "stride_mb": 0, "stride_mh": 0, "stride_mm": _N, "stride_mn": 1,
        "stride_rb": _N,
        "H": _H, "GROUP": _H // _HKV, "N_Q": _N, "N_KV": _N, "NUM_KV_BLOCKS": nb,
        "qk_scale": 0.5, "pv_thr2": 0.5, "N_CTX_KEY": 12, "WINDOW": 1024, "CAUSAL_OFF": 0,
    }


def _quant_args(c: dict, dt: str) -> dict:
    D = c["HEAD_DIM"]
    nb = _N // c["LAYOUT_BN"]
    mb = _N // c["LAYOUT_BM"]
    fp8 = c.get("PV_FP8", False)
    return {
        "Q": "*i8", "K": "*i8", "V": "*fp8e4nv" if fp8 else f"*{dt}", "Out": f"*{dt}", "Lse": "*fp32",
        "QScale": "*fp32", "KScale": "*fp32", "QRow": "*fp32", "VScale": "*fp32", "KvNum": "*i32", "KvIdx": "*i32",
        "stride_qb": _H * _N * D, "stride_qh": _N * D, "stride_qm": D,
        "stride_kb": _HKV * _N * D, "stride_kh": _N * D, "stride_kn": D,
        "stride_vb": _HKV * _N * D, "stride_vh": _N * D, "stride_v2": _N if fp8 else D,
        "stride_ob": _H * _N * D, "stride_oh": _N * D, "stride_om": D,
        "stride_lb": _H * _N, "stride_lh": _N,
        "stride_qsb": _H * (_N // 16), "stride_qsh": _N // 16,
        "stride_ksb": _HKV * (_N // 64), "stride_ksh": _N // 64,
        "stride_rb": _H * _N, "stride_rh": _N,
        "KBias": "*fp32", "stride_kbb": _H * _N, "stride_kbh": _N,
        "stride_nb": _H * mb, "stride_nh": mb, "stride_nm": 1,
        "stride_ib": _H * mb * nb, "stride_ih": mb * nb, "stride_im": nb, "stride_in": 1,
        "H": _H, "GROUP": _H // _HKV, "N_Q": _N, "N_KV": _N, "NUM_KV_BLOCKS": nb,
    }


_QUANT_BASE = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, LAYOUT_BM=128, LAYOUT_BN=128, CAUSAL=True,
                   QW=16, QT=1, QS=1, KW=64, KT=1, KS=1, K_SCALAR=True, PV_FP8=False, LIST_CHUNK=64)


_DECODE_BASE = dict(HEAD_DIM=128, BLOCK_M=16, BLOCK_N=64, SPLIT=True, HAS_SEQLENS=True, PAGED=False, PAGE=1)


def _decode_args(c: dict, dt: str) -> dict:
    D, G = c["HEAD_DIM"], _H // _HKV
    kv = "*i8" if c.get("HAS_KV_SCALE") else f"*{dt}"
    pages = _N // c["PAGE"]
    paged = c.get("PAGED", False)
    return {
        "Q": f"*{dt}", "K": kv, "V": kv, "SeqLens": "*i32", "PageIdx": "*i32" if paged else "*fp32",
        "PageNum": "*i32" if paged else "*fp32", "Out": f"*{dt}", "Lse": "*fp32", "OPart": "*fp32", "LPart": "*fp32",
        "KScale": "*fp32", "VScale": "*fp32",
        "stride_qb": _H * D, "stride_qh": D, "stride_qm": D,
        "stride_kb": _HKV * _N * D, "stride_kh": _N * D, "stride_kn": D,
        "stride_vb": _HKV * _N * D, "stride_vh": _N * D, "stride_vn": D,
        "stride_ob": _H * D, "stride_oh": D, "stride_om": D,
        "stride_lb": _H, "stride_lh": 1,
        "stride_pb": _HKV * pages if paged else 0, "stride_ph": pages if paged else 0, "stride_nb": _HKV if paged else 0,
        "stride_ksb": _HKV * _N, "stride_ksh": _N, "stride_ksn": 1,
        "stride_vsb": _HKV * _N, "stride_vsh": _N, "stride_vsn": 1,
        "H": _H, "G": G, "LQ": 1, "N_MAX": _N, "MAX_PAGES": pages if paged else 0, "NUM_SPLITS": 8,
        "qk_scale": 0.1275,
    }


def _compile_all(names: list[str], out_path: str) -> None:
    """Worker (run with PYTHONPATH at one revision's ``src``): compile each config, write {name: ptx | error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparseattn.ops.triton import block_sparse_fwd as fwd_mod
    from sparseattn.ops.triton import block_sparse_fwd_quant as quant_mod

    target = GPUTarget("cuda", 90, 64)
    res: dict[str, str] = {}
    for name in names:
        kind, over, opt_over, dt = CONFIGS[name]
        if kind == "fwd":
            fn = fwd_mod._block_sparse_fwd_kernel
            const = {**_BASE, **over}
            vals = _fwd_args(const, dt)
        elif kind == "quant":
            fn = quant_mod._block_sparse_fwd_quant_kernel
            const = {**_QUANT_BASE, **over}
            vals = _quant_args(const, dt)
        else:
            from sparseattn.ops.triton import decode as dec_mod

            fn = dec_mod._decode_split_kernel
            const = {**_DECODE_BASE, **over}
            vals = _decode_args(const, dt)
        no_spec = set(fn.do_not_specialize) | {fn.arg_names[i] for i in getattr(fn, "do_not_specialize", ())
                                               if isinstance(i, int)}
        sig: dict[str, str] = {}
        constexprs: dict[str, object] = {}
        attrs: dict[tuple[int, ...], list] = {}
        for i, p in enumerate(fn.params):
            a = p.name
            if a in const or p.is_constexpr:
                sig[a] = "constexpr"
                constexprs[a] = const[a] if a in const else p.default
                continue
            v = vals[a]
            if isinstance(v, str):
                sig[a] = v
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[a] = "fp32"
            elif a in no_spec:
                sig[a] = "i32"
            elif v == 1:
                sig[a] = "constexpr"
                constexprs[a] = 1
            else:
                sig[a] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        opts = {**_OPT, **opt_over}
        if opts.get("maxnreg") is None:
            opts.pop("maxnreg", None)
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=opts)
            res[name] = k.asm["ptx"]
            if os.environ.get("PTX_COMPARE_RESOURCES"):
                res[name + "#res"] = _resource_usage(k.asm["cubin"])
        except Exception as exc:  # reported, not fatal: the other configs still compile
            res[name] = f"!ERROR {type(exc).__name__}: {str(exc)[-3000:]}"
    Path(out_path).write_text(json.dumps(res))


def _resource_usage(cubin: bytes) -> str:
    """``REG:.. STACK:.. SHARED:.. LOCAL:..`` of the kernel, from Triton's bundled ``cuobjdump --dump-resource-usage``
    (STACK / LOCAL above 0 under a register cap mean spills), then its largest SASS loop (:func:`_sass_loop`)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", out)
    return (m.group(0) if m else out.strip()[-200:]) + _sass_loop(sass)


def _sass_loop(sass: str) -> str:
    """`` LOOP:n (OP:c, ...)``: the instruction count of the largest loop in ``sass`` (``cuobjdump --dump-sass``; the
    span from a backward branch's target to the branch) and its most frequent opcodes -- per-thread work per iteration
    (per K/V tile in the decode kernel); empty if the kernel has no loop."""
    lines = sass.splitlines()
    at = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)
        if m:
            at[int(m.group(1), 16)] = i
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16) and int(m.group(2), 16) in at:
            body = [x for x in lines[at[int(m.group(2), 16)]:i + 1] if re.match(r"\s+/\*[0-9a-f]{4,}\*/", x)]
            best = max(best, body, key=len)
    if not best:
        return ""
    ops: collections.Counter = collections.Counter()
    for x in best:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x)
        if m:
            ops[m.group(1)] += 1
    return f" LOOP:{len(best)} ({', '.join(f'{o}:{c}' for o, c in ops.most_common(8))})"


_REG = re.compile(r"%[a-z]+[0-9]+")


def normalize(ptx: str, rename_regs: bool = False) -> list[str]:
    """Instruction/directive lines without comments, ``.loc``/``.file`` line info and DWARF sections."""
    out: list[str] = []
    in_debug = False
    for line in ptx.splitlines():
        s = line.split("//", 1)[0].strip()
        if not s:
            continue
        if s.startswith(".section") and ".debug" in s:
            in_debug = True
            continue
        if in_debug:
            if s == "}":
                in_debug = False
            continue
        if s.startswith((".loc", ".file", "$L__", "@@")) and not s.startswith("$L__BB"):
            continue
        out.append(s)
    if rename_regs:
        names: dict[str, str] = {}

        def sub(m: re.Match) -> str:
            r = m.group(0)
            if r not in names:
                names[r] = f"%r{len(names)}"
            return names[r]

        out = [_REG.sub(sub, s) for s in out]
    return out


def opcode(line: str) -> str | None:
    s = line
    if s.startswith("@"):
        s = s.split(None, 1)[1] if " " in s else s
    if s.startswith((".", "}", "{", ")", "(")) or s.endswith(":") or s.endswith(","):
        return None
    return s.split()[0].rstrip(";")


def opcode_counts(lines: list[str]) -> collections.Counter:
    return collections.Counter(o for o in (opcode(s) for s in lines) if o is not None)


def _moved_lines(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """The lines of ``a`` that ``b`` drops and the lines ``b`` adds (a line diff)."""
    import difflib

    gone: list[str] = []
    came: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            gone.extend(a[i1:i2])
            came.extend(b[j1:j2])
    return gone, came


def _run_worker(src: Path, names: list[str], out: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(src), TRITON_CACHE_DIR=str(cache), PTX_COMPARE_NAMES=json.dumps(names))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", nargs="?", help="git revision of the 'before' kernels (e.g. b809532)")
    ap.add_argument("--only", default="", help="run only the configs whose name contains this text")
    ap.add_argument("--show-diff", action="store_true", help="print a unified diff of differing instruction text")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--resources", action="store_true",
                    help="also print each side's registers / stack (spills) / shared memory (cuobjdump of the cubin)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _compile_all(json.loads(os.environ["PTX_COMPARE_NAMES"]), a.worker)
        return 0
    if not a.before:
        ap.error("the 'before' git revision is required")
    if a.resources:
        os.environ["PTX_COMPARE_RESOURCES"] = "1"  # the workers inherit it
    names = [n for n in CONFIGS if a.only in n]
    with tempfile.TemporaryDirectory(prefix="ptx_compare_") as td:
        tmp = Path(td)
        old = tmp / "old"
        old.mkdir()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", a.before, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=arch, check=True)
        before = _run_worker(old / "src", names, tmp / "before.json", tmp / "cache_before")
        after = _run_worker(ROOT / "src", names, tmp / "after.json", tmp / "cache_after")
    rows = []
    failed = False
    width = max(len(n) for n in names)
    print(f"{'config':<{width}}  {'result':<16}  instructions (before -> after), differing opcodes")
    for n in names:
        b, f = before[n], after[n]
        if b.startswith("!ERROR") or f.startswith("!ERROR"):
            failed = True
            res = {"config": n, "result": "compile error", "detail": (b if b.startswith("!") else f)[:300]}
            print(f"{n:<{width}}  compile error     {res['detail']}")
            rows.append(res)
            continue
        nb, nf = normalize(b), normalize(f)
        cb, cf = opcode_counts(nb), opcode_counts(nf)
        tb, tf = sum(cb.values()), sum(cf.values())
        diff = {op: cf[op] - cb[op] for op in sorted(set(cb) | set(cf)) if cf[op] != cb[op]}
        moved = ""
        if nb == nf:
            result = "identical"
        elif collections.Counter(nb) == collections.Counter(nf):
            result = "reordered"  # the same lines, register names included: only their order differs
            gone, came = _moved_lines(nb, nf)
            moved = f"moved {len(gone)} lines: " + ", ".join(f"{op} x{c}" for op, c in opcode_counts(gone).most_common())
        elif normalize(b, True) == normalize(f, True):
            result = "same up to regs"
        elif sorted(normalize(b, True)) == sorted(normalize(f, True)) or not diff:
            result = "same multiset"
        else:
            result = "differs"
        detail = ", ".join(f"{op} {d:+d}" for op, d in diff.items()) or moved
        print(f"{n:<{width}}  {result:<16}  {tb} -> {tf}{'  ' + detail if detail else ''}")
        rows.append({"config": n, "result": result, "before": tb, "after": tf, "diff": diff, "moved": moved})
        if a.resources:
            rows[-1].update(resources_before=before.get(n + "#res"), resources_after=after.get(n + "#res"))
            print(f"{'':<{width}}  resources: {before.get(n + '#res')} -> {after.get(n + '#res')}")
        if a.show_diff and result != "identical":
            import difflib

            sys.stdout.writelines(difflib.unified_diff([s + "\n" for s in nb], [s + "\n" for s in nf],
                                                       "before", "after", n=2))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
