"""Launch parameters of the package's kernels as frozen dataclasses (configuration as data).

Each converts to and from the plain dict its launcher takes (``to_dict`` / ``from_dict``) and to JSON
(the same dict plus ``version``), so tuned winners are stored as data (``sparseattn/ops/tuned/*.json``,
:mod:`sparseattn.ops.registry`), never as Python literals. Light: imports nothing but the validator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparseattn._validation import fail

__all__ = ["BlockSparseFwdConfig", "DecodeLaunchConfig", "QuantLaunchConfig", "MeanSimLaunchConfig", "CONFIG_VERSION"]

CONFIG_VERSION = 1


def _pow2(fn: str, name: str, val: Any, low: int) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < low or val & (val - 1):
        raise fail(fn, name, "must be a power of two", f"a power of two >= {low}", repr(val))


def _opt_bool(fn: str, name: str, val: Any) -> None:
    if val is not None and not isinstance(val, bool):
        raise fail(fn, name, "must be a bool or None", "True, False or None", repr(val))


def _check_tiles(fn: str, cfg: Any) -> None:
    """The fields every kernel config has: power-of-two tiles and warps, 1..8 stages, optional maxnreg."""
    _pow2(fn, "block_m", cfg.block_m, 16)
    _pow2(fn, "block_n", cfg.block_n, 16)
    _pow2(fn, "num_warps", cfg.num_warps, 1)
    if isinstance(cfg.num_stages, bool) or not isinstance(cfg.num_stages, int) or not 1 <= cfg.num_stages <= 8:
        raise fail(fn, "num_stages", "must be an int in [1, 8]", "1..8", repr(cfg.num_stages))
    nreg = cfg.maxnreg
    if nreg is not None and (isinstance(nreg, bool) or not isinstance(nreg, int) or not 24 <= nreg <= 255):
        raise fail(fn, "maxnreg", "must be an int in [24, 255] or None", "24..255", repr(nreg))


class _KeyedConfig:
    """``to_dict`` / ``from_dict`` / JSON of a config dataclass whose fields map to launcher keys (``_KEYS``)."""

    _KEYS: tuple[tuple[str, str], ...] = ()
    _REQUIRED = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

    def to_dict(self) -> dict[str, Any]:
        """The launcher's dict (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages`` and the set options)."""
        return {key: getattr(self, f) for f, key in self._KEYS if getattr(self, f) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = dict((key, f) for f, key in cls._KEYS)
        if not isinstance(d, dict) or set(d) - set(names) or not set(cls._REQUIRED) <= set(d):
            raise fail(f"{cls.__name__}.from_dict", "d", "must name the launch parameters",
                       f"BLOCK_M, BLOCK_N, num_warps, num_stages and optionally {sorted(set(names) - set(cls._REQUIRED))}",
                       repr(d))
        return cls(**{names[k]: v for k, v in d.items()})

    def to_json(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **self.to_dict()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Any:
        if not isinstance(d, dict) or d.get("version") != CONFIG_VERSION:
            raise fail(f"{cls.__name__}.from_json", "version", "is not supported", CONFIG_VERSION,
                       repr(d.get("version") if isinstance(d, dict) else d))
        return cls.from_dict({k: v for k, v in d.items() if k != "version"})


@dataclasses.dataclass(frozen=True)
class BlockSparseFwdConfig(_KeyedConfig):
    """One fixed launch of the prefill kernel (:func:`sparseattn.ops.triton_launch.block_sparse_fwd`).

    ``block_m``/``block_n``: kernel tiles (must divide the layout blocks); ``num_warps``/``num_stages``;
    optional kernel switches (``None`` = the kernel's default): ``use_tma``, ``tma_qo``, ``prefetch``,
    ``vec_count``; ``list_chunk`` (power of two >= 16); ``rescale_tau`` (log2 units, 0 = off);
    compiler option ``maxnreg`` (24..255).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool | None = None
    tma_qo: bool | None = None
    prefetch: bool | None = None
    vec_count: bool | None = None
    list_chunk: int | None = None
    rescale_tau: float | None = None
    maxnreg: int | None = None

    _KEYS = (("block_m", "BLOCK_M"), ("block_n", "BLOCK_N"), ("num_warps", "num_warps"), ("num_stages", "num_stages"),
             ("use_tma", "USE_TMA"), ("tma_qo", "TMA_QO"), ("prefetch", "PREFETCH"), ("vec_count", "VEC_COUNT"),
             ("list_chunk", "LIST_CHUNK"), ("rescale_tau", "RESCALE_TAU"), ("maxnreg", "maxnreg"))

    def __post_init__(self) -> None:
        fn = "BlockSparseFwdConfig"
        _check_tiles(fn, self)
        for name in ("use_tma", "tma_qo", "prefetch", "vec_count"):
            _opt_bool(fn, name, getattr(self, name))
        if self.list_chunk is not None:
            _pow2(fn, "list_chunk", self.list_chunk, 16)
        tau = self.rescale_tau
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 16.0):
            raise fail(fn, "rescale_tau", "must be a number in [0, 16] (log2 units)", "0..16", repr(tau))


@dataclasses.dataclass(frozen=True)
class QuantLaunchConfig(_KeyedConfig):
    """One fixed launch of the quantized prefill kernel (:func:`sparseattn.ops.quant.quantized_attention`'s ``config``).

    ``block_m``/``block_n``: kernel tiles (must divide the layout blocks); ``num_warps``/``num_stages``;
    optional kernel switches (``None`` = off): ``use_tma`` (K/V tiles through Hopper tensor descriptors;
    CUDA sm_90+ only), ``tma_qo`` (Q load and output store through them too) and ``prefetch`` (the next
    key-block index read one iteration ahead); compiler option ``maxnreg`` (24..255, ``None`` = no cap).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool | None = None
    prefetch: bool | None = None
    tma_qo: bool | None = None
    maxnreg: int | None = None

    _KEYS = (("block_m", "BLOCK_M"), ("block_n", "BLOCK_N"), ("num_warps", "num_warps"), ("num_stages", "num_stages"),
             ("use_tma", "USE_TMA"), ("prefetch", "PREFETCH"), ("tma_qo", "TMA_QO"), ("maxnreg", "maxnreg"))

    def __post_init__(self) -> None:
        _check_tiles("QuantLaunchConfig", self)
        for name in ("use_tma", "prefetch", "tma_qo"):
            _opt_bool("QuantLaunchConfig", name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class DecodeLaunchConfig:
    """One fixed launch of the decode kernels (:func:`sparseattn.ops.decode.decode_attention`'s ``config``).

    Optional (``None`` = the default path; used only with a quantized cache and fp16/bf16 q): ``qk`` — the
    Q·Kᵀ variant, one of :data:`DECODE_QK_VARIANTS`; ``pv`` — the P·V variant, one of
    :data:`DECODE_PV_VARIANTS` (``"fp8"``: float8 caches only; ``"i8x2"``: int8 caches only, ``BLOCK_N``
    32..256; ``"fp16w"``: int8 caches stored ``[keys, head_dim]`` only, V read as 4-byte words); ``block_m`` —
    the smallest row tile (a power of two in 16..64; the launcher uses at least the rows' own tile);
    ``full_tiles`` — ``True``: the dense (not paged) kernel loads K, V and their scales without element masks
    (past a range's end it re-reads the range's last key, whose scores stay masked): the same output bit for bit,
    fewer instructions; ``ctas_per_sm`` — the split count of a launch without ``num_splits`` fills the GPU
    with this many programs per SM (:func:`sparseattn.ops.decode.decode_num_splits_filled`, an int in 1..16;
    ``None``: the wave heuristic :func:`sparseattn.ops.decode.decode_num_splits`).
    """

    block_n: int
    num_warps: int
    num_stages: int
    qk: str | None = None
    pv: str | None = None
    block_m: int | None = None
    full_tiles: bool | None = None
    ctas_per_sm: int | None = None

    _REQUIRED = ("BLOCK_N", "num_warps", "num_stages")
    _OPTIONAL = (("qk", "QK"), ("pv", "PV"), ("block_m", "BLOCK_M"), ("full_tiles", "FULL_TILES"),
                 ("ctas_per_sm", "CTAS_PER_SM"))

    def __post_init__(self) -> None:
        fn = "DecodeLaunchConfig"
        _pow2(fn, "block_n", self.block_n, 16)
        _pow2(fn, "num_warps", self.num_warps, 1)
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise fail(fn, "num_stages", "must be an int in [1, 8]", "1..8", repr(self.num_stages))
        if self.qk is not None and self.qk not in DECODE_QK_VARIANTS:
            raise fail(fn, "qk", "is not a known Q·K variant", f"None or one of {DECODE_QK_VARIANTS}", repr(self.qk))
        if self.pv is not None and self.pv not in DECODE_PV_VARIANTS:
            raise fail(fn, "pv", "is not a known P·V variant", f"None or one of {DECODE_PV_VARIANTS}", repr(self.pv))
        if self.block_m is not None:
            _pow2(fn, "block_m", self.block_m, 16)
            if self.block_m > 64:
                raise fail(fn, "block_m", "is too large", "a power of two in 16..64", repr(self.block_m))
        _opt_bool(fn, "full_tiles", self.full_tiles)
        c = self.ctas_per_sm
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 16):
            raise fail(fn, "ctas_per_sm", "must be None or an int in 1..16", "None or 1..16", repr(c))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"BLOCK_N": self.block_n, "num_warps": self.num_warps, "num_stages": self.num_stages}
        for f, key in self._OPTIONAL:
            if getattr(self, f) is not None:
                d[key] = getattr(self, f)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecodeLaunchConfig":
        names = dict((key, f) for f, key in cls._OPTIONAL)
        if not isinstance(d, dict) or not set(cls._REQUIRED) <= set(d) or set(d) - set(cls._REQUIRED) - set(names):
            raise fail("DecodeLaunchConfig.from_dict", "d", "must name exactly the launch parameters",
                       f"{sorted(cls._REQUIRED)} and optionally {sorted(names)}", repr(d))
        return cls(d["BLOCK_N"], d["num_warps"], d["num_stages"], **{names[k]: v for k, v in d.items() if k in names})


# variants of the quantized decode path (sparseattn.ops.triton.decode: QK_MODE / PV_MODE 0, 1, 2, ... in this order)
DECODE_QK_VARIANTS = ("dequant", "q8", "q8x2", "fp16")
DECODE_PV_VARIANTS = ("dequant", "fp16", "fp8", "i8x2", "fp16w")


@dataclasses.dataclass(frozen=True)
class MeanSimLaunchConfig(_KeyedConfig):
    """Launch parameters of the fused mean_sim predictor's three kernels (``predictors/fused_mean_sim.py``;
    the gate predictor's pool and select launches too).

    ``pool_elems``: elements of one ``[rows, D_PAD]`` float32 accumulator tile of the pool kernel (rows =
    ``pool_elems // D_PAD``); ``pool_warps``; ``score_tile``: the score GEMM's square tile where
    ``B·H·⌈Mb/64⌉·⌈Nb/64⌉ >= 256`` (shorter inputs take 32 or 16 so that enough programs fill the GPU);
    ``score_warps_mean`` / ``score_warps_minmax``: its warps for the mean score and for the min/max and mixed
    scores; ``select_cols_per_warp``: the select kernel's row length per warp (warps = ``RPAD / this``,
    clamped to 1..16). The defaults are the generic choice; measured winners live in
    ``sparseattn/ops/tuned/mean_sim.json`` (operator ``mean_sim_fused``).
    """

    pool_elems: int = 1024
    pool_warps: int = 2
    score_tile: int = 64
    score_warps_mean: int = 8
    score_warps_minmax: int = 4
    select_cols_per_warp: int = 256

    _KEYS = (("pool_elems", "POOL_ELEMS"), ("pool_warps", "POOL_WARPS"), ("score_tile", "SCORE_TILE"),
             ("score_warps_mean", "SCORE_WARPS_MEAN"), ("score_warps_minmax", "SCORE_WARPS_MINMAX"),
             ("select_cols_per_warp", "SELECT_COLS_PER_WARP"))

    def __post_init__(self) -> None:
        fn = "MeanSimLaunchConfig"
        _pow2(fn, "pool_elems", self.pool_elems, 16)
        _pow2(fn, "select_cols_per_warp", self.select_cols_per_warp, 32)
        for name in ("pool_warps", "score_warps_mean", "score_warps_minmax"):
            _pow2(fn, name, getattr(self, name), 1)
            if getattr(self, name) > 16:
                raise fail(fn, name, "is too large", "a power of two in 1..16", repr(getattr(self, name)))
        if self.score_tile not in (16, 32, 64, 128):
            raise fail(fn, "score_tile", "is not a supported tile", "16, 32, 64 or 128", repr(self.score_tile))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MeanSimLaunchConfig":  # every key required (no optional ones)
        names = dict((key, f) for f, key in cls._KEYS)
        if not isinstance(d, dict) or set(d) != set(names):
            raise fail("MeanSimLaunchConfig.from_dict", "d", "must name exactly the launch parameters",
                       sorted(names), repr(d))
        return cls(**{names[k]: v for k, v in d.items()})
