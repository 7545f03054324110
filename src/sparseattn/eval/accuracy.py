"""Op-level accuracy suite: is the backend right, and what does sparsity cost?

Every case runs ``sparseattn.attention(..., backend=...)`` once and reports two different things,
kept apart everywhere (JSON, markdown, console):

* **Correctness** — the backend's output against the float64 reference of the *same sparse op*
  (same inputs rounded to the case dtype, same layout). Judged by the ratio rule of
  :mod:`sparseattn.testing.tolerances`: the backend's max error must be at most ``RATIO`` times the
  error of the reference computed in the case dtype (``reference_attention(upcast=False)``) plus a
  floor. A failure here is a bug.
* **Cost of sparsity** — the backend's sparse output against the float64 *dense* attention of the
  same inputs: cosine, relative L1/L2, SQNR, and the softmax mass the layout keeps. Large numbers
  here are not bugs; they say how much the layout drops on these inputs.

Sections: ``sweep`` (sparsity level × sequence length × causal × dtype × GQA), ``stability``
(inputs ×100, near-constant rows) and ``edge`` (length 1, decode, lengths that are not block
multiples, all blocks masked, a single block, N_q ≠ N_kv both ways).

Inputs are seeded synthetic tensors (:mod:`sparseattn.testing.inputs`); the report says which.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail
from sparseattn.eval.metrics import precision_metric
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import PATTERNS, pattern_at_density
from sparseattn.ops.attention import attention, select_backend
from sparseattn.ops.reference import reference_attention
from sparseattn.testing.inputs import INPUT_KINDS, make_qkv
from sparseattn.testing.tolerances import ATOL_FLOOR, LSE_ATOL, RATIO, ratio_bound

__all__ = ["AccuracyConfig", "SPARSE_LEVELS", "run_accuracy_suite", "write_accuracy_report", "CONFIG_VERSION"]

CONFIG_VERSION = 1
# target density of the (causal) block region; shared with ``sparseattn quick-test``
SPARSE_LEVELS: dict[str, float] = {"low": 0.6, "medium": 0.4, "high": 0.25}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AccuracyConfig:
    """What the accuracy suite runs. Frozen, validated, JSON round-trippable (``version``).

    Args:
        seq_lens: sequence lengths of the sweep (N_q = N_kv).
        levels: sparsity level names (keys of ``SPARSE_LEVELS``).
        causal: causal settings swept.
        dtypes: dtype names swept.
        gqa: ``(heads, kv_heads)`` pairs swept.
        pattern: static pattern the layouts are built from (``pattern_at_density``).
        inputs: ``"structured"`` or ``"random"`` (see :mod:`sparseattn.testing.inputs`).
        head_dim, batch, block_size, seed: shapes and seeding.
        device: ``"cpu"``, ``"cuda"``...; backend: passed to :func:`sparseattn.attention`.
    """

    seq_lens: tuple[int, ...] = (512, 1024)
    levels: tuple[str, ...] = ("low", "medium", "high")
    causal: tuple[bool, ...] = (True, False)
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    gqa: tuple[tuple[int, int], ...] = ((4, 4), (4, 1))
    pattern: str = "sink_window"
    inputs: str = "structured"
    head_dim: int = 64
    batch: int = 1
    block_size: int = 64
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        fn = "AccuracyConfig"
        for name in ("seq_lens", "levels", "causal", "dtypes", "gqa"):
            val = getattr(self, name)
            if not isinstance(val, (tuple, list)) or len(val) == 0:
                raise fail(fn, name, "must be a non-empty sequence", "a tuple", repr(val))
            object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, list) else x for x in val))
        for n in self.seq_lens:
            check_positive_int(fn, "seq_lens", n)
        for lv in self.levels:
            if lv not in SPARSE_LEVELS:
                raise fail(fn, "levels", "has an unknown level", f"names from {sorted(SPARSE_LEVELS)}", repr(lv))
        for c in self.causal:
            if not isinstance(c, bool):
                raise fail(fn, "causal", "must hold bools", "True/False", repr(c))
        for d in self.dtypes:
            if d not in _DTYPES:
                raise fail(fn, "dtypes", "has an unknown dtype", f"names from {sorted(_DTYPES)}", repr(d))
        for pair in self.gqa:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise fail(fn, "gqa", "must hold (heads, kv_heads) pairs", "(int, int)", repr(pair))
            h, hkv = (check_positive_int(fn, "gqa", x) for x in pair)
            if h % hkv:
                raise fail(fn, "gqa", "has heads not divisible by kv_heads", "heads % kv_heads == 0", repr(pair))
        if self.pattern not in PATTERNS:
            raise fail(fn, "pattern", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(self.pattern))
        if self.inputs not in INPUT_KINDS:
            raise fail(fn, "inputs", "is not a known input kind", f"one of {sorted(INPUT_KINDS)}", repr(self.inputs))
        for name in ("head_dim", "batch", "block_size"):
            check_positive_int(fn, name, getattr(self, name))
        if self.version != CONFIG_VERSION:
            raise fail(fn, "version", "is not supported", CONFIG_VERSION, self.version)

    @classmethod
    def quick(cls, **overrides: Any) -> "AccuracyConfig":
        """A smaller grid (one length, fewer dtypes) for smoke runs and CI."""
        base: dict[str, Any] = dict(seq_lens=(384,), dtypes=("float32", "bfloat16"), gqa=((4, 4), (4, 1)), head_dim=32,
                                    block_size=32)
        base.update(overrides)
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AccuracyConfig":
        if not isinstance(data, dict):
            raise fail("AccuracyConfig.from_json", "data", "must be a dict", "dict", type(data).__name__)
        d = dict(data)
        if "gqa" in d:
            d["gqa"] = tuple(tuple(p) for p in d["gqa"])
        return cls(**d)


# ----------------------------------------------------------------------------------------- one case
def _err_stats(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _lse_err(lse: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Max abs error over rows both find finite; whether they agree on which rows are empty (-inf)."""
    fin_a, fin_b = torch.isfinite(lse), torch.isfinite(ref)
    same = bool(torch.equal(fin_a, fin_b))
    both = fin_a & fin_b
    err = float((lse.double()[both] - ref.double()[both]).abs().max()) if bool(both.any()) else 0.0
    return err, same


def run_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None, causal: bool,
             backend: str = "auto", dense64: Any = None) -> dict[str, Any]:
    """One accuracy case: correctness vs the fp64 same-op reference, cost vs fp64 dense attention.

    ``q, k, v`` are in the case dtype; references are computed from exactly these values in float64.
    ``dense64`` may pass a precomputed float64 dense ``AttentionState`` of the same inputs.
    """
    dtype = q.dtype
    name = select_backend(q, k, v, layout=layout, causal=causal, backend=backend)
    t0 = time.perf_counter()
    got = attention(q, k, v, causal=causal, layout=layout, backend=backend)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    elapsed = time.perf_counter() - t0
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref64 = reference_attention(q64, k64, v64, causal=causal, layout=layout)
    lo = reference_attention(q, k, v, causal=causal, layout=layout, upcast=False)
    if dense64 is None:
        dense64 = reference_attention(q64, k64, v64, causal=causal)

    nan_count = int(torch.isnan(got.out).sum()) + int(torch.isnan(got.lse).sum())
    err = _err_stats(got.out, ref64.out)
    err_lo = _err_stats(lo.out, ref64.out)
    lse_err_lo, _ = _lse_err(lo.lse, ref64.lse)
    key = dtype if dtype in ATOL_FLOOR else torch.float32
    # the same-dtype reference is the yardstick of the ratio rule; where it overflows (e.g. float16
    # scores of inputs x100 exceed 65504) it measures nothing, and the bound is the dtype's floor alone
    yardstick_ok = math.isfinite(err_lo) and math.isfinite(lse_err_lo)
    if yardstick_ok:
        bound = ratio_bound(err_lo, key)
        lse_bound = RATIO * lse_err_lo + LSE_ATOL[key]
    else:  # lse is stored in float32: its floor scales with its magnitude (|lse| ~ 1e4 at inputs x100)
        fin = torch.isfinite(ref64.lse)
        lse_mag = float(ref64.lse[fin].abs().max()) if bool(fin.any()) else 0.0
        bound, lse_bound = ATOL_FLOOR[key], LSE_ATOL[key] * max(1.0, lse_mag)
    lse_err, lse_same_empty = _lse_err(got.lse, ref64.lse)
    correct = bool(nan_count == 0 and err <= bound and lse_err <= lse_bound and lse_same_empty)

    density = layout.density(causal=causal) if layout is not None else 1.0
    cost = precision_metric(got.out, dense64.out, density=density)
    fin = torch.isfinite(dense64.lse)
    both = fin & torch.isfinite(ref64.lse)
    kept = torch.zeros_like(dense64.lse)
    kept[both] = torch.exp(ref64.lse[both] - dense64.lse[both])
    kept_mass = float(kept[fin].mean()) if bool(fin.any()) else 1.0
    empty_rows = int((~torch.isfinite(ref64.lse)).sum())
    return {
        "backend": name,
        "seconds": elapsed,
        "correctness": {
            "max_abs_err": err, "bound": bound, "same_dtype_ref_err": err_lo,
            "bound_rule": "ratio" if yardstick_ok else "floor (same-dtype reference overflowed)",
            "lse_max_abs_err": lse_err, "lse_bound": lse_bound, "lse_empty_rows_agree": lse_same_empty,
            "nan_count": nan_count, "pass": correct,
        },
        "cost": {
            "density": density, "sparsity": 1.0 - density, "cosine": cost["cosine"],
            "relative_l1": cost["relative_l1"], "relative_l2": cost["relative_l2"], "sqnr_db": cost["sqnr_db"],
            "max_abs": cost["max_abs"], "kept_mass": kept_mass, "empty_rows": empty_rows,
        },
    }


# ---------------------------------------------------------------------------------------- the suite
def _cases(cfg: AccuracyConfig) -> list[dict[str, Any]]:
    """The case descriptors, in run order (cheap; no tensors)."""
    cases: list[dict[str, Any]] = []
    for n in cfg.seq_lens:
        for causal in cfg.causal:
            for h, hkv in cfg.gqa:
                for dt in cfg.dtypes:
                    for lv in cfg.levels:
                        cases.append(dict(section="sweep", name=f"N={n} {'causal' if causal else 'full'} H={h}/{hkv} {dt} {lv}",
                                          seqlen_q=n, seqlen_kv=n, causal=causal, heads=h, kv_heads=hkv, dtype=dt,
                                          level=lv, density_target=SPARSE_LEVELS[lv], pattern=cfg.pattern,
                                          inputs=cfg.inputs))
    h, hkv = cfg.gqa[-1]
    n0 = min(cfg.seq_lens)
    mid = SPARSE_LEVELS["medium"]
    for dt in cfg.dtypes:
        cases.append(dict(section="stability", name=f"inputs x100 {dt}", seqlen_q=n0, seqlen_kv=n0, causal=True, heads=h,
                          kv_heads=hkv, dtype=dt, level="medium", density_target=mid, pattern=cfg.pattern,
                          inputs="random", input_scale=100.0))
        cases.append(dict(section="stability", name=f"near-constant rows {dt}", seqlen_q=n0, seqlen_kv=n0, causal=True,
                          heads=h, kv_heads=hkv, dtype=dt, level="medium", density_target=mid, pattern=cfg.pattern,
                          inputs="random", near_constant=True))
    bs = cfg.block_size
    dt = cfg.dtypes[0]
    edge = [
        ("length 1", 1, 1, True, mid),
        ("decode: N_q=1, N_kv not a block multiple", 1, 3 * bs + 5, True, mid),
        ("lengths not block multiples", 2 * bs + 17, 2 * bs + 17, True, mid),
        ("N_q < N_kv (bottom-right causal)", bs + 3, 3 * bs + 1, True, mid),
        ("N_q > N_kv (causal: leading rows empty)", 3 * bs + 1, bs + 3, True, mid),
        ("N_q > N_kv non-causal", 3 * bs + 1, bs + 3, False, mid),
        ("single block", bs, bs, True, 1.0),
        ("single partial block", bs - 7, bs - 7, False, 1.0),
        ("all blocks masked (density 0)", 2 * bs, 2 * bs, False, 0.0),
        ("all blocks masked, causal", 2 * bs, 2 * bs, True, 0.0),
    ]
    for name, nq, nkv, causal, dens in edge:
        cases.append(dict(section="edge", name=f"{name} {dt}", seqlen_q=nq, seqlen_kv=nkv, causal=causal, heads=h,
                          kv_heads=hkv, dtype=dt, level=None, density_target=dens,
                          pattern="random" if dens == 0.0 else cfg.pattern, inputs=cfg.inputs))
    return cases


def _inputs(cfg: AccuracyConfig, c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw: dict[str, Any] = dict(kv_heads=c["kv_heads"], seqlen_kv=c["seqlen_kv"], dtype=torch.float64, device="cpu",
                              seed=cfg.seed)
    if c["inputs"] == "random":
        kw["scale"] = c.get("input_scale", 1.0)
    q, k, v = make_qkv(c["inputs"], cfg.batch, c["heads"], c["seqlen_q"], cfg.head_dim, **kw)
    if c.get("near_constant"):
        # every score in a row (almost) equal: q nearly orthogonal to all keys -> near-uniform softmax
        g = torch.Generator().manual_seed(cfg.seed + 1)
        q = 1e-3 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        k = k + 50.0
    dt = _DTYPES[c["dtype"]]
    return q.to(cfg.device, dt), k.to(cfg.device, dt), v.to(cfg.device, dt)


def _layout(cfg: AccuracyConfig, c: dict[str, Any]) -> BlockLayout:
    bs = cfg.block_size
    kw: dict[str, Any] = dict(block_m=bs, block_n=bs, batch=cfg.batch, heads=c["heads"], device=cfg.device)
    if c["pattern"] == "random":
        kw["seed"] = cfg.seed
        if c["density_target"] == 0.0:
            kw["keep_diagonal"] = False
    return pattern_at_density(c["pattern"], c["seqlen_q"], c["seqlen_kv"], density=c["density_target"],
                              causal=c["causal"], **kw)


def run_accuracy_suite(cfg: AccuracyConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every case of ``cfg``; returns a JSON-able dict (``config``, ``environment``, ``cases``, ``summary``)."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, AccuracyConfig):
        raise fail("run_accuracy_suite", "cfg", "must be an AccuracyConfig", "AccuracyConfig", type(cfg).__name__)
    cases = _cases(cfg)
    dense_cache: dict[tuple, Any] = {}
    rows = []
    t_start = time.perf_counter()
    for c in tqdm(cases, desc="accuracy", unit="case", disable=not progress):
        q, k, v = _inputs(cfg, c)
        layout = _layout(cfg, c)
        key = (c["section"], c["seqlen_q"], c["seqlen_kv"], c["causal"], c["heads"], c["kv_heads"], c["dtype"],
               c.get("input_scale"), c.get("near_constant"), c["inputs"])
        if key not in dense_cache:
            dense_cache.clear()  # cases sharing inputs are consecutive
            dense_cache[key] = reference_attention(q.double(), k.double(), v.double(), causal=c["causal"])
        res = run_case(q, k, v, layout=layout, causal=c["causal"], backend=cfg.backend, dense64=dense_cache[key])
        rows.append({**c, **res})
    n_pass = sum(r["correctness"]["pass"] for r in rows)
    summary = {
        "cases": len(rows),
        "correctness_pass": n_pass,
        "correctness_fail": len(rows) - n_pass,
        "backends": sorted({r["backend"] for r in rows}),
        "seconds": time.perf_counter() - t_start,
    }
    from sparseattn.eval.env import environment

    env = environment(cfg.device)
    return {"config": cfg.to_json(), "environment": env, "cases": rows, "summary": summary}


# -------------------------------------------------------------------------------------- the report
_INPUT_DESC = {
    "structured": "seeded synthetic q/k with a local bias and one attention-sink token per head "
                  "(`sparseattn.testing.inputs.structured_qkv`) — not activations of a real model",
    "random": "seeded i.i.d. Gaussian q/k/v (`sparseattn.testing.inputs.random_qkv`): near-uniform attention, "
              "the hardest case for block sparsity",
}


def _fmt(x: Any, spec: str = ".3e") -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return format(x, spec)
    return str(x)


def _markdown(res: dict[str, Any]) -> str:
    cfg, env, rows, s = res["config"], res["environment"], res["cases"], res["summary"]
    L = ["# sparseattn accuracy report", ""]
    L.append(f"- date (UTC): {env['date_utc']}; torch {env['torch']}; device {env['device']} ({env.get('gpu') or env.get('cpu') or env.get('device_name')})")
    L.append(f"- backend requested: `{cfg['backend']}`; backends that ran: {', '.join(s['backends'])}")
    L.append(f"- sweep inputs: {_INPUT_DESC[cfg['inputs']]}; stability cases use random inputs")
    L.append(f"- layouts: `{cfg['pattern']}` pattern at the target density of each sparsity level "
             f"({', '.join(f'{k}={v}' for k, v in SPARSE_LEVELS.items())}), block {cfg['block_size']}x{cfg['block_size']}, "
             f"head_dim {cfg['head_dim']}, batch {cfg['batch']}, seed {cfg['seed']}")
    L.append(f"- **correctness: {s['correctness_pass']}/{s['cases']} cases pass**; run time {s['seconds']:.1f} s")
    if s["backends"] == ["reference"]:
        L.append("- note: only the PyTorch reference ran (no GPU kernel on this device), so the correctness "
                 "section checks the reference in the case dtype against itself in float64 (rounding only); "
                 "run on a GPU to check the Triton kernel.")
    L += ["", "## 1. Correctness — backend vs the float64 reference of the same sparse op", "",
          f"Pass: max error <= {RATIO} x (error of the same-dtype reference) + floor, the same for lse, "
          "no NaN, and the same empty (-inf) rows (where the same-dtype reference overflows, the bound is the "
          "floor alone: see `bound_rule` in the JSON). A failure here is a bug.", "",
          "| section | case | backend | max abs err | bound | lse err | lse bound | NaN | pass |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["correctness"]
        L.append(f"| {r['section']} | {r['name']} | {r['backend']} | {_fmt(c['max_abs_err'])} | {_fmt(c['bound'])} | "
                 f"{_fmt(c['lse_max_abs_err'])} | {_fmt(c['lse_bound'])} | {c['nan_count']} | "
                 f"{'PASS' if c['pass'] else '**FAIL**'} |")
    L += ["", "## 2. Cost of sparsity — sparse output vs float64 dense attention of the same inputs", "",
          "Not a pass/fail: how much the layout changes the output on these inputs. `kept mass` is the mean "
          "over rows of the dense softmax probability inside the selected blocks (1 = nothing dropped).", "",
          "| section | case | density | sparsity | cosine | rel L1 | rel L2 | SQNR dB | kept mass | empty rows |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cost"]
        L.append(f"| {r['section']} | {r['name']} | {c['density']:.3f} | {c['sparsity']:.1%} | {_fmt(c['cosine'], '.5f')} | "
                 f"{_fmt(c['relative_l1'], '.4f')} | {_fmt(c['relative_l2'], '.4f')} | {_fmt(c['sqnr_db'], '.1f')} | "
                 f"{c['kept_mass']:.4f} | {c['empty_rows']} |")
    # compact view of the sweep: mean cost per sparsity level
    sweep = [r for r in rows if r["section"] == "sweep"]
    if sweep:
        L += ["", "### Sweep summary (mean over lengths, causal settings, dtypes, GQA)", "",
              "| level | target density | mean density | mean cosine | mean rel L1 | mean kept mass |", "|---|---|---|---|---|---|"]
        for lv in cfg["levels"]:
            rs = [r for r in sweep if r["level"] == lv]
            if rs:
                m = lambda key: sum(r["cost"][key] for r in rs) / len(rs)  # noqa: E731
                L.append(f"| {lv} | {SPARSE_LEVELS[lv]} | {m('density'):.3f} | {m('cosine'):.5f} | {m('relative_l1'):.4f} | "
                         f"{m('kept_mass'):.4f} |")
    L += ["", "Plots: `attention_comparison.png` (dense vs sparse attention map of one head and their difference), "
          "`sparse_pattern.png` (the block mask).", ""]
    return "\n".join(L)


def _plots(cfg: AccuracyConfig, out_dir: Path) -> list[Path]:
    """Attention maps (dense / sparse / difference) and the block mask of head 0 at the medium level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(256, max(cfg.seq_lens))
    bs = min(cfg.block_size, 32)
    q, k, v = make_qkv(cfg.inputs, 1, 1, n, cfg.head_dim, dtype=torch.float64, seed=cfg.seed)
    lay = pattern_at_density(cfg.pattern, n, density=SPARSE_LEVELS["medium"], causal=True, block_m=bs, block_n=bs)
    s = (q[0, 0] @ k[0, 0].T) * cfg.head_dim ** -0.5
    causal_mask = torch.ones(n, n, dtype=torch.bool).tril()
    dense_p = torch.softmax(s.masked_fill(~causal_mask, -math.inf), -1)
    sel = lay.element_mask(causal=True)[0, 0]
    sparse_p = torch.softmax(s.masked_fill(~sel, -math.inf), -1).nan_to_num(0.0)
    paths = []
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    from matplotlib.colors import LogNorm

    floor = 1e-5  # log colour scale: the sink column and the decay away from the diagonal stay visible
    norm = LogNorm(vmin=floor, vmax=1.0)
    for a, img, title in ((ax[0], dense_p, "dense (causal), log scale"),
                          (ax[1], sparse_p, f"sparse ({cfg.pattern}, density {lay.density(True):.2f}), log scale")):
        im = a.imshow(img.clamp(min=floor).numpy(), cmap="viridis", norm=norm, interpolation="nearest")
        a.set_title(title)
        a.set_xlabel("key")
        a.set_ylabel("query")
        fig.colorbar(im, ax=a, fraction=0.046)
    diff = (sparse_p - dense_p).numpy()
    lim = float(abs(diff).max()) or 1.0
    im = ax[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax[2].set_title("sparse − dense")
    ax[2].set_xlabel("key")
    fig.colorbar(im, ax=ax[2], fraction=0.046)
    fig.suptitle(f"attention probabilities, one head, N={n}, {cfg.inputs} synthetic inputs")
    fig.tight_layout()
    p = out_dir / "attention_comparison.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, a = plt.subplots(figsize=(5.5, 5))
    region = torch.ones(lay.num_q_blocks, lay.num_kv_blocks, dtype=torch.bool).tril()
    img = lay.to_dense_mask()[0, 0].int() + region.int()  # 0 outside causal region, 1 dropped, 2 selected
    from matplotlib.colors import ListedColormap

    a.imshow(img.numpy(), cmap=ListedColormap(["white", "#d9d9d9", "#1f77b4"]), vmin=0, vmax=2, interpolation="nearest")
    a.set_title(f"block mask: {cfg.pattern}, {bs}x{bs} blocks\nblue = computed, grey = skipped (causal region)")
    a.set_xlabel("key block")
    a.set_ylabel("query block")
    fig.tight_layout()
    p = out_dir / "sparse_pattern.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_accuracy_report(res: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``accuracy.json``, ``accuracy.md`` and (with matplotlib) the two PNGs into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    p = out / "accuracy.json"
    p.write_text(json.dumps(res, indent=2, default=lambda x: repr(x)))
    paths["json"] = p
    p = out / "accuracy.md"
    p.write_text(_markdown(res))
    paths["markdown"] = p
    if plots:
        cfg = AccuracyConfig.from_json(res["config"])
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"write_accuracy_report: plots need matplotlib ({exc}); install sparseattn[viz] "
                               "or pass plots=False (--no-plots)") from exc
        a, b = _plots(cfg, out)
        paths["attention_comparison"] = a
        paths["sparse_pattern"] = b
    return paths
