"""Launcher for the Triton block-sparse forward kernel: validate → allocate → grid → kernel.

:func:`refusal` says, without launching anything, whether the kernel can run the inputs (``None``)
or why not (a precise reason the dispatcher turns into ``NotImplementedError`` or a warning).
:func:`block_sparse_fwd` validates again (it may be called directly), allocates ``out``/``lse`` and
launches :mod:`sparseattn.ops.triton.block_sparse_fwd`.

Triton is imported lazily here, so ``import sparseattn`` never pulls it in. On CPU tensors the
kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported), which is how CI tests it.

Environment:
    ``SPARSEATTN_TRITON_AUTOTUNE=0`` — use one fixed launch config per head_dim/layout instead of
    autotuning (saves compile time in parity sweeps; the autotuned path is the default on CUDA).
    ``SPARSEATTN_TRITON_TMA=0`` — leave the TMA (tensor-descriptor) candidates out of autotuning.

Caches and threads (every cache is bounded; see :mod:`sparseattn._cache`):
    ``_TUNED`` — remembered autotune winner per (TMA, head_dim, layout blocks, causal, length bucket,
    dtype, device *name* (``"NVIDIA H200"``: GPUs of one model share winners), sliding window on/off; with a carried state or a float mask also those two flags): a :class:`~sparseattn._cache.BoundedCache` of ``_TUNED_MAX`` (256) entries
    (an evicted key re-asks Triton's autotuner, whose own per-key cache answers without benchmarking).
    ``_DENSE_BASE`` — the one-row dense layout used for ``layout=None`` (the sliding-window band with
    ``sliding_window``), per (lengths, blocks, causal, window, device string): ``_DENSE_BASE_MAX`` (64) entries. ``_kernels`` / ``_triton_import_error`` /
    ``_triton_has_descriptors`` take no arguments (one entry each); ``checks._capability_of`` holds one entry
    per GPU index. A launch's telemetry is returned to the caller (``telemetry={}``), never kept in a global.

    Triton's runtime is not safe under concurrent host threads: its autotuner keeps per-call state
    on the shared autotuner object (``nargs``, ``best_config``), a JIT compile on a cache miss is not
    serialised, and the CPU interpreter patches ``triton.language`` globally while a kernel runs.
    The launch call itself (kernel lookup/compile/autotune + enqueue, tens of microseconds once
    compiled) is therefore made under one process-wide lock; validation, allocation and the GPU
    work of different threads (on their own streams) still overlap. Triton's scratch allocator for
    TMA descriptors is a context variable (per thread), so it is installed per thread.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import threading
import warnings
from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import check_row_bounds
from sparseattn.ops.kernel_args import ordered_args
from sparseattn.ops.launch_configs import BlockSparseFwdConfig
from sparseattn.ops.registry import TunedConfigs, TunedEntry, check_tuned_configs, device_name, shipped_launch_winners
# the shared checks and the cached GPU capability (re-exported: decode and tests look them up here)
from sparseattn.ops.checks import (_capability, _check_kv_scales, check_attn_mask,
                                  check_raw_state, check_segment)
from sparseattn.state.types import AttentionState, RawState

__all__ = ["refusal", "block_sparse_fwd", "interpret_mode", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535
_CONFIG_FLAGS = {"USE_TMA", "PREFETCH", "VEC_COUNT", "TMA_QO"}  # optional boolean kernel switches a fixed config may set
_CONFIG_OPTIONS = {"maxnreg"}  # optional compiler options a fixed config may set (register cap per thread)
_CONFIG_INTS = {"LIST_CHUNK"}  # optional integer kernel parameters a fixed config may override
_CONFIG_FLOATS = {"RESCALE_TAU"}  # optional float kernel parameters (lazy-rescale threshold, log2 units)
_MAX_LIST_CHUNK = 1024  # list entries counted per vector load in the kernel's prologue
TMA_DISABLED_REASON: list[str] = []  # set once if the TMA candidates cannot run on this install


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET`` set to a non-zero value)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    import importlib

    try:
        importlib.import_module("triton.language")  # imports triton too
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def device_refusal(q: torch.Tensor, what: str = "the Triton kernel") -> str | None:
    """Why ``q``'s device cannot run a Triton kernel of this package (None: it can): every kernel's first check."""
    if q.device.type == "cuda":
        major, minor = _capability(q.device)
        if major < 8:
            return f"needs a CUDA GPU of compute capability >= 8.0; {q.device} has {major}.{minor}"
    elif q.device.type == "cpu":
        if not interpret_mode():
            return f"q is on the CPU; {what} needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    else:
        return f"q is on {q.device}; {what} needs CUDA tensors"
    return None


def refusal(
    q: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    layout: BlockLayout | None = None,
    causal: bool = False,
    pv_threshold: float | None = None,
    sliding_window: int | None = None,
    **_: Any,
) -> str | None:
    """``None`` if the Triton kernel supports these inputs, else the reason it does not.

    Only *support* is judged here (device, dtype, head_dim, block sizes, Triton availability);
    malformed inputs are reported as ``ValueError`` by :func:`block_sparse_fwd`. A valid
    ``sliding_window`` (causal only; checked there) is supported on every accepted input.
    """
    if not isinstance(q, torch.Tensor):
        return f"q is a {type(q).__name__}, not a torch.Tensor"
    why = device_refusal(q)
    if why is not None:
        return why
    return support_refusal(q, layout, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, SUPPORTED_BLOCK_SIZES, _MAX_GRID_Y)


def support_refusal(q: torch.Tensor, layout: Any, dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
                    block_sizes: tuple[int, ...], max_grid_y: int, by: str = "") -> str | None:
    """The rest of a prefill kernel's refusal after its device check (:func:`refusal`, the quantized kernel's):
    dtype, head_dim, layout block sizes, launch grid, Triton; ``by`` names the kernel in the messages."""
    if q.dtype not in dtypes:
        return f"dtype {str(q.dtype).replace('torch.', '')} is not supported{by} (float16 or bfloat16 only)"
    if q.dim() == 4 and q.shape[-1] not in head_dims:
        return f"head_dim {q.shape[-1]} is not supported{by} (one of {head_dims})"
    if layout is not None and isinstance(layout, BlockLayout):
        for name, val in (("block_m", layout.block_m), ("block_n", layout.block_n)):
            if val not in block_sizes:
                return f"layout {name}={val} is not supported{by} (one of {block_sizes})"
    if q.dim() == 4 and q.shape[0] * q.shape[1] > max_grid_y:
        return f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the launch grid limit {max_grid_y}"
    return _triton_import_error()


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any, Any]:
    """(plain kernel, autotuned without TMA, autotuned with TMA candidates)."""
    import triton

    from sparseattn.ops.triton import block_sparse_fwd as mod
    from sparseattn.ops.triton import configs

    plain = mod._block_sparse_fwd_kernel
    # the window flag changes the kernel's work split, so it keys the autotuner's memo too
    key = [*configs.AUTOTUNE_KEY, "HAS_WINDOW", "HAS_STATE", "HAS_FLOAT_MASK", "HAS_ROW_BOUNDS"]
    tuned = [triton.autotune(configs=configs.autotune_configs(tma), key=key,
                             prune_configs_by={"early_config_prune": configs.prune}, do_bench=configs.safe_bench)(plain)
             for tma in (False, True)]
    return plain, tuned[0], tuned[1]


@functools.lru_cache(maxsize=None)
def _triton_has_descriptors() -> bool:
    import triton
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def _tma_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *more: torch.Tensor) -> bool:
    """Device-side TMA descriptors: sm_90+, Triton with descriptors, 16-byte aligned K/V (and ``more``) rows and heads."""
    if not q.is_cuda or interpret_mode() or os.environ.get("SPARSEATTN_TRITON_TMA", "1") == "0":
        return False
    if _capability(q.device)[0] < 9 or not _triton_has_descriptors():
        return False
    for t in (k, v, *more):
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:3]):
            return False
    return True


# The device whose scratch allocator this thread (context) installed. Triton keeps the allocator in a
# ContextVar, so a new thread starts without one: the memo must be per context too, not global.
_ALLOCATOR_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparseattn_tma_allocator", default=None)


def _set_tma_allocator(device: torch.device) -> None:
    """Triton needs global scratch for descriptors built inside kernels (installed once per thread and device)."""
    import triton

    dev = str(device)
    if _ALLOCATOR_FOR.get() == dev:
        return
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=dev, dtype=torch.int8))
    _ALLOCATOR_FOR.set(dev)


# Serialises the host-side launch call (see the module docstring); re-entrant so a nested launch from an
# autotuner hook cannot deadlock.
_LAUNCH_LOCK = threading.RLock()

# Autotuned choice per (TMA usable, head_dim, layout blocks, causal, length bucket, dtype, device string): after
# the first call of a key, later calls launch the compiled kernel directly with the chosen config, skipping
# the autotuner's dispatch and the TMA attempt (host time per call matters for sub-millisecond calls).
_TUNED_MAX = 256
_TUNED: BoundedCache[tuple[Any, ...], dict[str, Any]] = BoundedCache(_TUNED_MAX, name="triton_launch._TUNED")

# layout=None: one [1, 1, Mb] / [1, 1, Mb, Nb] dense layout per geometry, expanded (stride 0) to B x H per call.
_DENSE_BASE_MAX = 64
_DENSE_BASE: BoundedCache[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = BoundedCache(
    _DENSE_BASE_MAX, name="triton_launch._DENSE_BASE")


def _dense_layout_base(Nq: int, Nkv: int, bm: int, bn: int, causal: bool, device: str,
                       window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        from sparseattn.layout.patterns import dense_layout, sliding_window_band_layout

        if window is not None:  # only the band's blocks (causal by construction)
            lay = sliding_window_band_layout(Nq, Nkv, window=window, block_m=bm, block_n=bn, device=device)
        else:
            lay = dense_layout(Nq, Nkv, block_m=bm, block_n=bn, causal=causal, device=device)
        return lay.kv_num_blocks[:1, :1].contiguous(), lay.kv_indices[:1, :1].contiguous()

    return _DENSE_BASE.get_or_build((Nq, Nkv, bm, bn, causal, window, device), build)


def _dense_layout(B: int, H: int, Nq: int, Nkv: int, causal: bool, device: torch.device,
                  window: int | None = None) -> BlockLayout:
    bm = bn = 128
    num, idx = _dense_layout_base(Nq, Nkv, bm, bn, causal, str(device), window)
    return BlockLayout(num.expand(B, H, -1), idx.expand(B, H, -1, -1), bm, bn, Nq, Nkv, validate=False)


def _check_out(fn: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise fail(fn, name, "must be a torch.Tensor", "torch.Tensor", type(t).__name__)
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise fail(fn, name, "has the wrong shape, dtype or device", f"{shape} {dtype} on {device}",
                   f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if t.stride(-1) != 1:
        raise fail(fn, name, "must have a contiguous last dimension", "stride(-1) == 1", f"stride={t.stride()}")


def _note_compiled(kern: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """The compiled kernel's resources (cheap attribute reads, no sync), returned to the launcher's caller
    (``telemetry={}`` of :func:`block_sparse_fwd`)."""
    md = getattr(kern, "metadata", None)
    return {"config": dict(cfg), "n_regs": getattr(kern, "n_regs", None),
            "n_spills": getattr(kern, "n_spills", None), "shared_bytes": getattr(md, "shared", None)}


def _remember(key: tuple[Any, ...] | None, tuned: Any) -> None:
    best = getattr(tuned, "best_config", None)
    if key is None or best is None:
        return
    kw = best.kwargs
    cfg: dict[str, Any] = {"BLOCK_M": kw["BLOCK_M"], "BLOCK_N": kw["BLOCK_N"], "num_warps": best.num_warps,
                           "num_stages": best.num_stages, "USE_TMA": bool(kw.get("USE_TMA", False))}
    cfg.update({f: bool(kw[f]) for f in _CONFIG_FLAGS if f in kw})
    if getattr(best, "maxnreg", None) is not None:
        cfg["maxnreg"] = int(best.maxnreg)
    _TUNED.put(key, cfg)


# The remembered winners as data: TunedConfigs entries per device name (ops/registry.py), JSON on disk.
_OPERATOR = "triton"
_KEY_FIELDS = ("tma", "head_dim", "layout_block_m", "layout_block_n", "causal", "n_ctx_log2", "dtype", "device",
               "window")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _key_to_match(key: tuple[Any, ...]) -> tuple[str, dict[str, Any]] | None:
    """(device name, match facts) of a ``_TUNED`` key; ``None`` for keys that are not launch keys."""
    if len(key) not in (9, 10, 11, 12) or not isinstance(key[6], torch.dtype):
        return None
    m = dict(zip(_KEY_FIELDS, key[:9]))
    dev = m.pop("device")
    m["dtype"] = str(m["dtype"]).replace("torch.", "")
    rest = key[9:]
    if rest and rest[-1] == "row_bounds":
        m["row_bounds"] = True
        rest = rest[:-1]
    if rest:
        m["state"], m["float_mask"] = bool(rest[0]), bool(rest[1])
    return dev, m


def _match_to_key(dev: str, m: dict[str, Any]) -> tuple[Any, ...]:
    key: tuple[Any, ...] = (bool(m["tma"]), int(m["head_dim"]), int(m["layout_block_m"]), int(m["layout_block_n"]),
                            bool(m["causal"]), int(m["n_ctx_log2"]), _DTYPES[m["dtype"]], dev, bool(m["window"]))
    if "state" in m:
        key = (*key, bool(m["state"]), bool(m["float_mask"]))
    if m.get("row_bounds"):
        key = (*key, "row_bounds")
    return key


def tuned_configs() -> TunedConfigs:
    """The autotune winners remembered so far, per device name (save with
    :func:`sparseattn.ops.registry.save_tuned_configs`)."""
    devices: dict[str, list[TunedEntry]] = {}
    for key in _TUNED.keys():
        cfg = _TUNED.get(key)
        got = _key_to_match(key) if isinstance(key, tuple) else None
        if got is not None and cfg is not None:
            devices.setdefault(got[0], []).append(TunedEntry(got[1], dict(cfg)))
    return TunedConfigs(_OPERATOR, {d: tuple(e) for d, e in devices.items()})


def use_tuned_configs(configs: TunedConfigs) -> int:
    """Seed the launcher's remembered winners from ``configs`` (e.g. :func:`load_tuned_configs`); returns the count.

    A seeded key launches its config directly (no autotuning) on GPUs of that device name.
    """
    fn = "use_tuned_configs"
    check_tuned_configs(fn, configs, _OPERATOR)
    n = 0
    for dev, entries in configs.devices.items():
        for i, e in enumerate(entries):
            missing = [f for f in _KEY_FIELDS if f != "device" and f not in e.match]
            if missing or e.match.get("dtype") not in _DTYPES:
                raise fail(fn, f"configs.devices[{dev!r}][{i}].match", "is not a launch key of this kernel",
                           f"keys {[f for f in _KEY_FIELDS if f != 'device']} with dtype float16/bfloat16",
                           repr(e.match))
            cfg = BlockSparseFwdConfig.from_dict(dict(e.config)).to_dict()  # checked
            _TUNED.put(_match_to_key(dev, e.match), cfg)
            n += 1
    return n


@functools.lru_cache(maxsize=64)
def _seed_shipped(dev_name: str) -> None:
    """Seed the autotune winners the package ships for this device name (ops/tuned/prefill.json, once per name).

    Only entries keyed by a whole launch key are autotune winners (none shipped yet); the file's entries
    keyed by (head_dim, layout blocks) are the fixed config (:func:`sparseattn.ops.triton.configs.default_config`).
    """
    winners = shipped_launch_winners(_OPERATOR, dev_name, [f for f in _KEY_FIELDS if f != "device"])
    if winners is not None:
        use_tuned_configs(winners)


def _autotune_launch(tuned_plain: Any, tuned_tma: Any, tune_key: tuple[Any, ...] | None, args: tuple[Any, ...],
                     meta: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     B: int, H: int, Nq: int, fn: str) -> dict[str, Any]:
    """The autotuned launch: the TMA candidates where usable (a failure disables them for the process), else
    pointer loads; the winner is remembered under ``tune_key``."""
    grid = lambda META: (-(-Nq // META["BLOCK_M"]), B * H)  # noqa: E731
    ran = False
    if not TMA_DISABLED_REASON and _tma_usable(q, k, v, q, out):
        try:
            _set_tma_allocator(q.device)
            kern = tuned_tma[grid](*args, **meta)
            ran = True
            _remember(tune_key, tuned_tma)
            rec = _note_compiled(kern, _TUNED.get(tune_key, {}))
        except Exception as exc:  # an older Triton that cannot build descriptors: pointer loads from now on
            TMA_DISABLED_REASON.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            warnings.warn(f"{fn}: TMA autotuning failed, using pointer loads: {TMA_DISABLED_REASON[0]}",
                          RuntimeWarning, stacklevel=5)
    if not ran:
        kern = tuned_plain[grid](*args, **meta)
        _remember(tune_key, tuned_plain)
        rec = _note_compiled(kern, _TUNED.get(tune_key, {}))
    return rec


def _launch(plain: Any, tuned_plain: Any, tuned_tma: Any, cfg: dict[str, Any] | None, tune_key: tuple[Any, ...] | None,
            args: tuple[Any, ...], meta: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, B: int, H: int, Nq: int, fn: str) -> dict[str, Any]:
    """Launch the kernel: autotune (``cfg is None``) or the fixed ``cfg``. Called with ``_LAUNCH_LOCK`` held.

    Returns the launch telemetry (:func:`_note_compiled`; an autotuned launch adds ``failed_configs``, the
    candidates that failed to build or run)."""
    if cfg is None:
        from sparseattn.ops.triton.configs import autotune_failures

        with autotune_failures() as failed:
            rec = _autotune_launch(tuned_plain, tuned_tma, tune_key, args, meta, q, k, v, out, B, H, Nq, fn)
        rec["failed_configs"] = failed
        return rec
    else:
        grid = (-(-Nq // cfg["BLOCK_M"]), B * H)
        meta.update({f: bool(cfg[f]) for f in _CONFIG_FLAGS if f in cfg})
        meta.update({f: int(cfg[f]) for f in _CONFIG_INTS if cfg.get(f) is not None})
        meta.update({f: float(cfg[f]) for f in _CONFIG_FLOATS if cfg.get(f) is not None})
        if cfg.get("USE_TMA"):
            _set_tma_allocator(q.device)
        opts = {o: int(cfg[o]) for o in _CONFIG_OPTIONS if cfg.get(o) is not None}
        kern = plain[grid](*args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"], **opts)
        return _note_compiled(kern, cfg)



def _check_fixed_config(fn: str, config: dict[str, Any], layout: BlockLayout, pv: bool, has_kv_scale: bool,
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> dict[str, Any]:
    """A caller's fixed launch config, checked against these inputs (tiles vs layout blocks, P·V skip, TMA, quantized
    K/V); returns a copy to launch with."""
    need = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    if not isinstance(config, dict) or not (need <= set(config) <= need | _CONFIG_FLAGS | _CONFIG_OPTIONS | _CONFIG_INTS | _CONFIG_FLOATS):
        raise fail(fn, "config", "must name exactly the launch parameters", sorted(need), repr(config))
    if layout.block_m % config["BLOCK_M"] or layout.block_n % config["BLOCK_N"]:
        raise fail(fn, "config", "tiles must divide the layout blocks", f"divisors of ({layout.block_m}, {layout.block_n})",
                   f"({config['BLOCK_M']}, {config['BLOCK_N']})")
    if pv and (config["BLOCK_M"], config["BLOCK_N"]) != (layout.block_m, layout.block_n):
        raise fail(fn, "config", "must use the layout's blocks as tiles with pv_threshold",
                   f"({layout.block_m}, {layout.block_n})", f"({config['BLOCK_M']}, {config['BLOCK_N']})")
    nreg = config.get("maxnreg")
    if nreg is not None and (isinstance(nreg, bool) or not isinstance(nreg, int) or not 24 <= nreg <= 255):
        raise fail(fn, "config", "has a bad maxnreg", "an int in [24, 255] or None", repr(nreg))
    chunk = config.get("LIST_CHUNK")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1)):
        raise fail(fn, "config", "has a bad LIST_CHUNK", "a power of two >= 16", repr(chunk))
    tau = config.get("RESCALE_TAU")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 16.0):
        raise fail(fn, "config", "has a bad RESCALE_TAU", "a number in [0, 16] (log2 units)", repr(tau))
    if pv and tau:
        raise fail(fn, "config", "cannot use RESCALE_TAU with pv_threshold (the skip rule needs the exact running max)",
                   "RESCALE_TAU=0", repr(tau))
    if has_kv_scale and (config.get("USE_TMA") or config.get("TMA_QO")):
        raise fail(fn, "config", "cannot use TMA with quantized K/V (k_scale/v_scale)", "USE_TMA/TMA_QO off",
                   repr(config))
    if config.get("USE_TMA") and q.is_cuda and not _tma_usable(q, k, v):
        raise fail(fn, "config", "asks for TMA loads these inputs cannot use",
                   "sm_90+, 16-byte aligned K/V, Triton with tensor descriptors", repr(config))
    if config.get("TMA_QO") and q.is_cuda and not _tma_usable(q, k, v, q, out):
        raise fail(fn, "config", "asks for TMA Q/O transfers these inputs cannot use",
                   "sm_90+, 16-byte aligned Q, K, V and out, Triton with tensor descriptors", repr(config))
    return dict(config)


def block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: BlockLayout | None,
    causal: bool = False,
    scale: float | None = None,
    pv_threshold: float | None = None,
    stats: dict[str, Any] | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: "dict[str, int] | BlockSparseFwdConfig | None" = None,
    sliding_window: int | None = None,
    attn_mask: torch.Tensor | None = None,
    state_in: RawState | None = None,
    return_state: bool = False,
    kv_offset: int = 0,
    kv_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    row_bounds: Any = None,
    telemetry: dict[str, Any] | None = None,
) -> Any:
    """Block-sparse attention forward on the Triton kernel.

    Args:
        q: ``(B, H, N_q, D)`` float16/bfloat16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        k: ``(B, H_kv, N_kv, D)``; ``H % H_kv == 0`` (GQA: kv head ``h // (H // H_kv)``, never copied).
        v: same shape as ``k``.
        layout: key blocks per query block (block sizes 64 or 128); ``None`` = dense.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``<= i + N_kv - N_q``).
        scale: softmax scale, default ``D ** -0.5``.
        pv_threshold: softmax-aware P·V skip, the rule of
            :func:`sparseattn.ops.reference.reference_attention` (natural-log units, > 0).
        stats: if given, filled with ``visited_tiles`` (selected layout tiles holding at least one
            causally allowed pair) and ``pv_skipped_tiles`` (tiles whose P·V was skipped); both are
            counted only with ``pv_threshold`` (0 otherwise), exactly as the reference counts them.
        out: optional preallocated output ``(B, H, N_q, D)`` in q's dtype (last dim contiguous).
        lse: optional preallocated ``(B, H, N_q)`` float32 (last dim contiguous).
        config: fixed launch config, a :class:`~sparseattn.ops.launch_configs.BlockSparseFwdConfig` or the
            dict ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``, optionally
            with the kernel switches ``USE_TMA`` / ``TMA_QO`` / ``PREFETCH`` / ``VEC_COUNT`` (bools), the list
            chunk ``LIST_CHUNK`` (power of two >= 16), the lazy-rescale threshold ``RESCALE_TAU``
            (log2 units, 0 = off; not with ``pv_threshold``) and the compiler option ``maxnreg``
            (int), instead of autotuning (tests, experiments).
        sliding_window: exact causal sliding window of ``W`` keys (``causal=True`` only): query ``i``
            attends keys ``j`` with ``i + OFF - W < j <= i + OFF`` (``OFF = N_kv - N_q``), intersected
            with ``layout``. Key blocks below every row's window are never loaded; ``layout=None``
            runs on the band layout. ``W >= N_kv`` is plain causal attention (the window-free kernel).
        attn_mask: additive float mask ``(B|1, H|1, N_q, N_kv)`` (0 attend, ``-inf`` masked, finite =
            bias), any float dtype (float64 is converted to float32), loaded per tile through its
            strides (stride 0 for broadcast dims); combined with ``layout``/``causal``/``sliding_window``.
            A row whose attended keys are all ``-inf`` is empty (out 0, lse ``-inf``).
        state_in: incoming :class:`~sparseattn.state.types.RawState` ``(m, l, acc)`` (float32; ``m``
            in log2 units of the scaled score) over keys of earlier segments; ``None`` = empty.
        return_state: also return the outgoing raw state (keys of earlier segments and of ``k``).
        kv_offset: global position of ``k``'s first key (state path; see ``kv_len``).
        kv_len: total key length of the sequence ``k`` is a segment of (default ``kv_offset + N_kv``).
            With ``causal`` the queries are the last ``N_q`` positions of that sequence: query ``i``
            attends global keys ``<= i + kv_len - N_q``. Any of ``state_in`` / ``return_state`` /
            ``kv_offset`` / ``kv_len`` selects the state path (``HAS_STATE``): segments whose
            boundaries are multiples of the layout's ``block_n`` (128 for ``layout=None``), carried
            with the raw state and run with one fixed ``config``, give bitwise the result of one call.
        k_scale, v_scale: quantized K/V (``HAS_KV_SCALE``): ``k``/``v`` then hold int8 or float8_e4m3fn
            values and these their float32 per-key scales ``(B, H_kv, N_kv)`` (or ``(..., 1)``); the kernel
            dequantises in registers (``k`` converted to q's dtype, the scale applied to the scores;
            ``v``'s scale folded into P). Pointer loads (no TMA); a fixed config (no autotuning).
        row_bounds: per-row key interval :class:`~sparseattn.layout.patterns.RowBounds` ``(lo, hi)``,
            integer ``[B|1, N_q]`` (``HAS_ROW_BOUNDS``): row ``r`` attends key ``j`` only if
            ``lo[r] <= j <= hi[r]`` (packed documents, prefix-LM), ANDed with ``causal``, ``layout`` and
            ``attn_mask``. A ``sliding_window`` is folded into ``lo`` (the kernel then runs without
            ``HAS_WINDOW``). ``layout=None`` runs on the exact layout of the bounds
            (:func:`~sparseattn.layout.patterns.row_bounds_layout`, built per call on the device; the
            public :func:`sparseattn.attention` caches it). Not with ``pv_threshold`` or the state path.
        telemetry: if given (a dict), filled with this launch's record: ``config`` (the launch parameters
            used), ``n_regs``, ``n_spills``, ``shared_bytes`` (of the compiled kernel; ``None`` under the
            interpreter) and ``autotuned`` (the config came from autotuning, now or remembered); a launch that
            autotuned now also ``failed_configs`` (the candidates that failed to build or run). Nothing is
            kept in module globals.

    Returns:
        ``AttentionState(out, lse)``: out ``(B, H, N_q, D)`` in q's dtype; lse ``(B, H, N_q)``
        natural-log float32. Rows with no attended key: out 0, lse ``-inf``. With ``return_state``:
        ``(AttentionState, RawState)``; out/lse then cover every key carried so far.

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)``; layout ``[B, H, ceil(N_q/block_m), ...]``.

    Raises:
        ValueError: malformed inputs (shapes, dtypes, a layout built for other lengths or batch/heads,
            bad ``pv_threshold``, bad ``out``/``lse``/``config``).
        NotImplementedError: valid inputs the kernel does not support (see :func:`refusal`).
    """
    fn = "block_sparse_fwd"
    k_scale, v_scale = _check_kv_scales(fn, q, k, v, k_scale, v_scale)
    has_kv_scale = k_scale is not None
    if has_kv_scale:  # validate the geometry with stand-ins of q's dtype (zero-size storage, no copy)
        kq = torch.zeros((), dtype=q.dtype, device=k.device).expand(k.shape)
        vq = torch.zeros((), dtype=q.dtype, device=v.device).expand(v.shape)
    else:
        kq, vq = k, v
    (B, H, Hkv, Nq, Nkv, D), scale = check_attention_args(fn, q, kq, vq, causal=causal, layout=layout, scale=scale,
                                                           pv_threshold=pv_threshold, sliding_window=sliding_window)
    reason = refusal(q, k=k, v=v, layout=layout, causal=causal, pv_threshold=pv_threshold, sliding_window=sliding_window)
    if reason is not None:
        raise NotImplementedError(f"{fn}: the Triton kernel cannot run these inputs: {reason}")
    mask_t = check_attn_mask(fn, attn_mask, B, H, Nq, Nkv, q.device)
    if mask_t is not None and mask_t.dtype == torch.float64:
        mask_t = mask_t.to(torch.float32)  # the kernel loads fp16/bf16/fp32 masks
    if not isinstance(return_state, bool):
        raise fail(fn, "return_state", "must be a bool", "True or False", repr(return_state))
    has_state = state_in is not None or return_state or kv_offset != 0 or kv_len is not None
    total, off = check_segment(fn, kv_offset, kv_len, Nq, Nkv)
    if has_state:
        if pv_threshold is not None:
            raise fail(fn, "pv_threshold", "is not supported on the state path", "None", repr(pv_threshold))
        state_in = check_raw_state(fn, "state_in", state_in, B, H, Nq, D, q.device, torch.float32)
    window = sliding_window if sliding_window is not None and sliding_window < total else None  # else: no cut
    bounds = check_row_bounds(fn, row_bounds, B, Nq, q.device)
    if bounds is not None:
        if pv_threshold is not None:
            raise fail(fn, "pv_threshold", "is not supported with row_bounds (the kernel's tile counters ignore them)",
                       "None", repr(pv_threshold))
        if has_state:
            raise fail(fn, "row_bounds", "are not supported on the state path (state_in/return_state/kv_offset/kv_len)",
                       "no row_bounds with a carried state", "row_bounds with the state path")
        if window is not None:  # fold the window into lo: the kernel takes one interval per row
            from sparseattn.layout.patterns import RowBounds

            first = torch.arange(Nq, device=q.device, dtype=torch.int32) + (Nkv - Nq - window + 1)
            bounds = RowBounds(torch.maximum(bounds.lo, first[None]).contiguous(), bounds.hi)
            window = None
        if layout is None:
            from sparseattn.layout.patterns import row_bounds_layout

            layout = row_bounds_layout(bounds, Nq, Nkv, block_m=128, block_n=128, batch=B, heads=H, causal=causal)
    if layout is None:
        if has_state:  # every key block listed; the kernel skips the blocks above a row's diagonal (offset OFF)
            layout = _dense_layout(B, H, Nq, Nkv, False, q.device)
        else:
            layout = _dense_layout(B, H, Nq, Nkv, causal, q.device, window)

    # the kernel indexes rows through strides; only the last dim must be unit-stride
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    _check_out(fn, "out", out, (B, H, Nq, D), q.dtype, q.device)
    _check_out(fn, "lse", lse, (B, H, Nq), torch.float32, q.device)
    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)

    from sparseattn.ops.triton import configs as cfgs

    pv = pv_threshold is not None
    interp = interpret_mode()
    plain, tuned_plain, tuned_tma = _kernels()
    if isinstance(config, BlockSparseFwdConfig):
        config = config.to_dict()
    if config is not None:
        cfg: dict[str, int] | None = _check_fixed_config(fn, config, layout, pv, has_kv_scale, q, k, v, out)
    elif pv or interp or has_kv_scale or os.environ.get("SPARSEATTN_TRITON_AUTOTUNE", "1") == "0":
        cfg = cfgs.default_config(D, layout.block_m, layout.block_n, interpret=interp, pv_skip=pv,
                                  device=device_name(q.device) if q.is_cuda else None)
    else:
        cfg = None  # autotune

    stats_buf = None
    if pv:  # one (visited, skipped) pair per program; tiles are layout blocks, so programs = B*H*Mb
        stats_buf = torch.zeros((B * H * layout.num_q_blocks, 2), dtype=torch.int32, device=q.device)
    num_t, idx_t = layout.kv_num_blocks, layout.kv_indices
    n_ctx_key = int(math.ceil(math.log2(max(Nq, Nkv, 2))))
    tune_key: tuple[Any, ...] | None = None
    autotuned = cfg is None
    if cfg is None:
        use_tma = not TMA_DISABLED_REASON and _tma_usable(q, k, v, q, out)
        dev_name = device_name(q.device)
        _seed_shipped(dev_name)
        tune_key = (use_tma, D, layout.block_m, layout.block_n, causal, n_ctx_key, q.dtype, dev_name,
                    window is not None)
        if has_state or mask_t is not None:  # appended only then: the default path keeps its keys
            tune_key = (*tune_key, has_state, mask_t is not None)
        if bounds is not None:
            tune_key = (*tune_key, "row_bounds")
        cfg = _TUNED.get(tune_key)  # None on the first call of this key: autotune below
    st_out: RawState | None = None
    if has_state:
        if state_in is None:
            st_in = RawState(torch.full((B, H, Nq), -math.inf, dtype=torch.float32, device=q.device),
                             torch.zeros((B, H, Nq), dtype=torch.float32, device=q.device),
                             torch.zeros((B, H, Nq, D), dtype=torch.float32, device=q.device))
        else:
            st_in = RawState(*(t.contiguous() for t in state_in))
        st_out = RawState(torch.empty_like(st_in.m), torch.empty_like(st_in.l), torch.empty_like(st_in.acc))
        st_ptrs: tuple[torch.Tensor, ...] = (*st_in, *st_out)
    else:
        st_ptrs = (lse,) * 6  # placeholders (never read without HAS_STATE)
    if mask_t is not None:
        ms = [0 if mask_t.shape[i] == 1 else mask_t.stride(i) for i in range(4)]
    else:
        ms = [0, 0, 0, 0]
    unused = lse  # a placeholder pointer for buffers the compiled variant never reads
    st_names = ("SmIn", "SlIn", "SaccIn", "SmOut", "SlOut", "SaccOut")
    named: dict[str, Any] = dict(
        Q=q, K=k, V=v, Out=out, Lse=lse, KvNum=num_t, KvIdx=idx_t,
        Stats=stats_buf if stats_buf is not None else unused,
        Mask=mask_t if mask_t is not None else unused,
        **dict(zip(st_names, st_ptrs)),
        KScale=k_scale if k_scale is not None else unused, VScale=v_scale if v_scale is not None else unused,
        RowLo=bounds.lo if bounds is not None else unused, RowHi=bounds.hi if bounds is not None else unused,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        stride_nb=num_t.stride(0), stride_nh=num_t.stride(1), stride_nm=num_t.stride(2),
        stride_ib=idx_t.stride(0), stride_ih=idx_t.stride(1), stride_im=idx_t.stride(2), stride_in=idx_t.stride(3),
        stride_mb=ms[0], stride_mh=ms[1], stride_mm=ms[2], stride_mn=ms[3],
        stride_rb=0 if bounds is None or bounds.lo.shape[0] == 1 else bounds.lo.stride(0),
        H=H, GROUP=H // Hkv, N_Q=Nq, N_KV=Nkv, NUM_KV_BLOCKS=layout.num_kv_blocks,
        qk_scale=float(scale) * _LOG2E, pv_thr2=float(pv_threshold) * _LOG2E if pv else 0.0,
        N_CTX_KEY=n_ctx_key,
        WINDOW=0 if window is None else int(window),
        CAUSAL_OFF=off if has_state else 0,
    )
    args = ordered_args(plain, named)
    list_chunk = min(max(16, 1 << (layout.num_kv_blocks - 1).bit_length()), _MAX_LIST_CHUNK)
    meta = dict(HEAD_DIM=D, LAYOUT_BM=layout.block_m, LAYOUT_BN=layout.block_n, CAUSAL=causal, PV_SKIP=pv,
                LIST_CHUNK=list_chunk)
    if window is not None:
        meta["HAS_WINDOW"] = True  # absent otherwise: the default (False) compiles the window-free kernel
    if has_state:
        meta["HAS_STATE"] = True  # likewise: absent = the state-free kernel
    if mask_t is not None:
        meta["HAS_FLOAT_MASK"] = True
    if has_kv_scale:
        meta["HAS_KV_SCALE"] = True
    if bounds is not None:
        meta["HAS_ROW_BOUNDS"] = True
    if interp and q.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (garbage, seen with triton 3.9): widen the
        # operands to fp32 there. Products of bf16 values are exact in fp32, so this matches the GPU's
        # bf16 MMA with fp32 accumulation up to summation order. GPUs always take the native path.
        meta["DOT_F32"] = True
    with _LAUNCH_LOCK:  # Triton's launch/compile/autotune path is not thread-safe (module docstring)
        if cfg is None:
            cfg = _TUNED.get(tune_key)  # another thread may have tuned this key while we waited for the lock
        rec = _launch(plain, tuned_plain, tuned_tma, cfg, tune_key, args, meta, q, k, v, out, B, H, Nq, fn)
    if telemetry is not None:
        telemetry.clear()
        telemetry.update(rec)
        telemetry["autotuned"] = autotuned

    if stats is not None:
        if stats_buf is not None:
            tot = stats_buf.sum(0, dtype=torch.int64).tolist()
            stats["visited_tiles"] = int(tot[0])
            stats["pv_skipped_tiles"] = int(tot[1])
        else:  # like the reference: tiles are counted only with pv_threshold
            stats["visited_tiles"] = 0
            stats["pv_skipped_tiles"] = 0
    if return_state:
        return AttentionState(out, lse), st_out
    return AttentionState(out, lse)
