"""Attention masks of a patched layer's prefill: the plain-causal check and packed sequences.

:class:`PackedMixin` gives :class:`~sparseattn.integrations.handle.PatchHandle` ``_mask_ok`` (is the
model's mask plain causal, with the layer's window: one host read per mask object and forward, a device-side
assertion inside a capture or ``torch.compile``), ``_packed`` (the document ids when the mask is exactly the
packed-sequence mask of ``position_ids``) and ``_packed_call`` (sparse prefill of packed sequences: the
layer's layout intersected with the exact document mask, each document keeping its first block as its sink).
From a layer's second packed call on, the whole call is replayed from a layer graph (``_graphed_packed``)
that reads per-geometry static document buffers (``_packed_buffers``), refreshed once per forward.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.integrations._tracing import _compiling
from sparseattn.integrations.masks import (_causal_equivalent, _causal_match, _packed_documents, _packed_match,
                                           document_sink_mask)
from sparseattn.integrations.routes import _ROUTES, _pv_for, _route_key
from sparseattn.predictors.pattern import PatternPredictor

__all__ = ["PackedMixin"]


class PackedMixin:
    """Mask verdicts and packed sequences of :class:`~sparseattn.integrations.handle.PatchHandle`."""

    _mask_verdicts: dict[tuple[Any, ...], Any]
    _mask_refs: list[torch.Tensor]
    _packed_static: dict[tuple[Any, ...], tuple[torch.Tensor, ...]]
    _packed_blocks: dict[int, tuple[int, int]]

    def _mask_ok(self, mask: torch.Tensor, nq: int, nkv: int, window: int | None) -> bool:
        """Whether ``mask`` is plain causal (+ window); one host read per mask object, cached for the forward."""
        if _compiling():
            # dynamo cannot read the mask without breaking the graph (transformers materialises one while tracing,
            # e.g. for its packed-sequence check): assert on the device instead. A mask that is not plain causal
            # (+ window) stops the run with a device-side assertion, never a wrong answer.
            torch._assert_async(_causal_match(mask, nq, nkv, window),
                                "patch_model: the attention mask of a compiled sparse layer is not plain causal (padding "
                                "or a custom mask); sparse prefill supports unpadded causal inputs only")
            return True
        key = (id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), nq, nkv, window)
        verdict = self._mask_verdicts.get(key)
        if verdict is None:
            if mask.is_cuda and torch.cuda.is_current_stream_capturing():
                # a capture cannot read the mask (transformers materialises one while capturing, e.g. for its
                # packed-sequence check): the graph asserts on the device, once per mask object and forward, and
                # every replay re-checks it; a mask that is not plain causal (+ window) stops the run
                torch._assert_async(_causal_match(mask, nq, nkv, window),
                                    "patch_model: the attention mask of a captured sparse layer is not plain causal "
                                    "(padding or a custom mask); sparse prefill supports unpadded causal inputs only")
                verdict = True
            else:
                verdict = _causal_equivalent(mask, nq, nkv, window)
            self._mask_verdicts[key] = verdict
            self._mask_refs.append(mask)  # keeps the object alive, so its id is not reused within the forward
        return verdict

    def _packed(self, mask: torch.Tensor, position_ids: Any, B: int, nq: int, nkv: int,
                window: int | None) -> torch.Tensor | None:
        """Document ids when ``mask`` is exactly the packed-sequence mask of ``position_ids``, else None.

        One host read per mask object and forward (cached with the causal verdicts); inside a capture or
        ``torch.compile`` a device-side assertion instead, as for plain causal masks.
        """
        # the document ids of a forward's position_ids: computed once and shared by its layers (the per-forward dict)
        pkey = None
        if isinstance(position_ids, torch.Tensor) and not _compiling():
            pkey = ("docs", id(position_ids), position_ids.data_ptr(), position_ids._version, B, nq, nkv)
        docs = self._mask_verdicts.get(pkey) if pkey is not None else None
        if docs is None:
            docs = _packed_documents(position_ids, B, nq, nkv)
            if docs is None:
                return None
            if pkey is not None:
                self._mask_verdicts[pkey] = docs
                self._mask_refs.append(position_ids)
        if _compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            torch._assert_async(_packed_match(mask, docs, window),
                                "patch_model: the attention mask of a sparse layer is neither plain causal nor the "
                                "packed-sequence mask of position_ids; sparse prefill supports neither padding nor "
                                "custom masks")
            return docs
        key = ("packed", id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), id(position_ids),
               position_ids.data_ptr(), position_ids._version, window)
        verdict = self._mask_verdicts.get(key)
        if verdict is None:
            verdict = bool(_packed_match(mask, docs, window))  # the one host read
            self._mask_verdicts[key] = verdict
            self._mask_refs.extend((mask, position_ids))
        return docs if verdict else None

    def _packed_prep(self, docs: torch.Tensor, B: int, H: int, nq: int, nkv: int, win: int | None, bm: int, bn: int,
                     device: torch.device) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """What a packed forward's sparse layers share, built once per forward and block geometry (device ops only):
        ``(bounds, exact, dense, sinks)`` = the row bounds (the window folded in), the exact document layout
        ``[B, H]``, its block mask ``[B, 1, Mb, Nb]`` and each document's sink block (inside that mask)."""
        key = ("packed_prep", id(docs), B, H, nq, nkv, win, bm, bn)
        hit = self._mask_verdicts.get(key)
        if hit is None:
            from sparseattn.ops.attention import _exact_mask

            exact, bounds, _, _ = _exact_mask("patch_model", B, H, nq, nkv, device, causal=True, layout=None,
                                              sliding_window=win, pv_threshold=None, cu_seqlens=None,
                                              document_ids=docs, prefix_len=None, blocks=(bm, bn))
            dense = exact.to_dense_mask()[:, :1]  # [B, 1, Mb, Nb]: the same for every head
            sinks = document_sink_mask(docs, dense.shape[-2], dense.shape[-1], bm, bn) & dense
            hit = self._mask_verdicts[key] = (bounds, exact, dense, sinks)
        return hit

    def _packed_call(self, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kwargs: dict[str, Any], win: int | None, docs: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Sparse prefill of packed sequences: the layer's layout intersected with the exact document mask.

        Per call: the prediction, one OR (each document's sink block) and one AND (the document blocks) of block
        masks, then the kernel with the per-row document bounds. The bounds, the exact document layout and the
        sink blocks are built once per forward (:meth:`_packed_prep`); a static pattern's final layout too. On
        CUDA, once an eager call has settled the route (Triton) and the layer's block sizes, the call is a layer
        graph replay (:meth:`_graphed_packed`) where the layer allows graphs.
        """
        from sparseattn.ops.attention import select_backend

        fn = "patch_model"
        if self.quant is not None:
            raise NotImplementedError(str(fail(fn, f"quant={self.quant!r}", "cannot run packed sequences (the quantized "
                                               "kernel has no document masks)", "quant=None", "packed position_ids")))
        t0 = time.perf_counter()
        B, H, nq, D = query.shape
        nkv = key.shape[2]
        pred = None if mode == "window" else self.predictors[layer]
        pv = None if pred is None else _pv_for(pred, layer)
        if pv is not None:
            raise NotImplementedError(f"{fn}: layer {layer} has pv_threshold={pv}, which packed sequences (document "
                                      "masks) do not support; patch without pv_threshold")
        static = pred is None or (isinstance(pred, PatternPredictor) and not self.per_head.get(layer))
        rkey = _route_key(self.backend, "packed", query, key, value, None, win)
        blocks = (128, 128) if pred is None else self._packed_blocks.get(layer)
        if query.is_cuda and blocks is not None and _ROUTES.get(rkey) == "triton":  # route settled by an eager call
            res = self._graphed_packed(layer, mode, query, key, value, kwargs, win, docs, blocks, static, t0)
            if res is not None:
                return res
        base = None if pred is None else self._layout(layer, query, key)
        bm, bn = (128, 128) if base is None else (base.block_m, base.block_n)
        if base is not None:
            self._packed_blocks[layer] = (bm, bn)  # a later call may be graphed without predicting first
        bounds, exact, dense, sinks = self._packed_prep(docs, B, H, nq, nkv, win, bm, bn, query.device)
        if base is None:
            layout = exact
        else:
            lkey = ("packed_layout", id(docs), id(base), B, H, nq, nkv, win)
            hit = self._mask_verdicts.get(lkey) if static else None
            if hit is None or hit[0] is not base:
                layout = _document_layout(base, sinks, dense)
                if static:
                    self._mask_verdicts[lkey] = (base, layout)
            else:
                layout = hit[1]
        used = _ROUTES.get(rkey)
        if used is None:  # once per shape: validated and chosen as attention() would (a warning if it is slow)
            from sparseattn._validation import check_attention_args

            check_attention_args(fn, query, key, value, causal=True, layout=layout, scale=kwargs.get("scaling"),
                                 pv_threshold=None)
            used = select_backend(query, key, value, layout=layout, causal=True, func=fn,
                                  backend={"triton": "triton", "reference": "reference"}.get(self.backend, "auto"))
            _ROUTES.put(rkey, used)
        if used == "triton":
            from sparseattn.ops import triton_launch

            out = torch.empty((B, nq, H, D), dtype=query.dtype, device=query.device)  # written through a transposed view
            triton_launch.block_sparse_fwd(query, key, value, layout=layout, causal=True, scale=kwargs.get("scaling"),
                                           out=out.transpose(1, 2), row_bounds=bounds)
        else:
            from sparseattn.ops.registry import get_operator

            out = get_operator(used).run_fn()(query, key, value, causal=True, layout=layout, scale=kwargs.get("scaling"),
                                              pv_threshold=None, stats=None, sliding_window=None,
                                              row_bounds=bounds).out.transpose(1, 2)
        density = self._density(layout, static, win) if base is not None else None
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        self.counts["prefill_packed"] += 1
        if density is not None:
            self._density_raw.setdefault(layer, []).append(density)
        self.backends_used.setdefault(layer, set()).add("packed:" + used)
        return (out if out.is_contiguous() else out.contiguous()), None

    def _packed_buffers(self, docs: torch.Tensor, B: int, H: int, nq: int, nkv: int, win: int | None, bm: int,
                        bn: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Static copies of this forward's :meth:`_packed_prep` tensors (row bounds, document and sink block masks),
        one set per geometry for the handle's life: the packed layer graphs read them, and each forward copies
        its documents in once (four small device copies), before the first replay of that geometry."""
        gkey = (B, H, nq, nkv, win, bm, bn, str(device))
        bounds, _, dense, sinks = self._packed_prep(docs, B, H, nq, nkv, win, bm, bn, device)
        srcs = (bounds.lo, bounds.hi, dense, sinks)
        bufs = self._packed_static.get(gkey)
        if bufs is None or any(d.shape != t.shape for d, t in zip(bufs, srcs)):
            # a new set (e.g. per-batch bounds after shared ones); graphs of an old set keep theirs alive
            bufs = self._packed_static[gkey] = tuple(torch.empty_like(t) for t in srcs)
        mark = ("packed_copied", id(docs), gkey)
        if self._mask_verdicts.get(mark) is None:
            for dst, src in zip(bufs, srcs):
                dst.copy_(src)
            self._mask_verdicts[mark] = True
        return bufs

    def _graphed_packed(self, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kwargs: dict[str, Any], win: int | None, docs: torch.Tensor, blocks: tuple[int, int],
                        static: bool, t0: float) -> tuple[torch.Tensor, None] | None:
        """A packed layer call replayed from a CUDA graph (None: run it eagerly).

        The graph holds the whole call: the prediction (a static pattern's layout is fixed), the sink OR and the
        document AND of block masks, the compaction and the kernel with the row bounds, reading the documents
        from :meth:`_packed_buffers`; the predicted layout's block counts are summed on the device.
        """
        from sparseattn.integrations.layer_graphs import DensityAccumulator
        from sparseattn.layout.block_layout import BlockLayout, compact_mask
        from sparseattn.layout.patterns import RowBounds

        why = self._graph_reason(layer, mode, query)
        if why is not None:
            self._not_graphed(layer, why)
            return None
        B, H, nq, D = query.shape
        nkv = key.shape[2]
        bm, bn = blocks
        lo, hi, dense, sinks = self._packed_buffers(docs, B, H, nq, nkv, win, bm, bn, query.device)
        pred = self.predictors[layer] if mode != "window" else None
        fixed = self._layout(layer, query, key) if (static and pred is not None) else None  # a pattern's cached layout
        scale = kwargs.get("scaling")
        accum = DensityAccumulator() if pred is not None else None

        def body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> Any:
            from sparseattn.ops import triton_launch

            if pred is None:  # a window layer: the exact document band (the window is folded into lo)
                num, idx = compact_mask(dense)
                Bb = num.shape[0]
                layout = BlockLayout(num.expand(Bb, H, -1), idx.expand(Bb, H, -1, -1), bm, bn, nq, nkv,
                                     validate=False)
            else:
                layout = _document_layout(fixed if fixed is not None else pred.predict(q, k, causal=True, layer=layer),
                                          sinks, dense)
            triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=True, scale=scale, out=out.transpose(1, 2),
                                           row_bounds=RowBounds(lo, hi))
            if accum is not None:
                accum.add(layout.selected_in_region(causal=True), layout.available_blocks(causal=True))
            return None

        body.accum = accum  # type: ignore[attr-defined] - read by LayerGraphs (warm-up)
        gkey = ("packed", layer, mode, win, id(pred), id(fixed), scale, lo.data_ptr(), dense.data_ptr())
        res = self._run_layer_graph(gkey, layer, query, key, value, body, f"layer {layer} (packed)", t0,
                                    ("prefill_sparse", "prefill_packed"))
        if res is None:
            return None
        self.backends_used.setdefault(layer, set()).add("packed:triton")
        return res[0], None


def _document_layout(base: Any, sinks: torch.Tensor, dense: torch.Tensor) -> Any:
    """``base`` plus each document's sink block, restricted to the document blocks (device ops only): the layout a
    packed sparse layer runs, eager or inside its layer graph."""
    from sparseattn.layout.block_layout import BlockLayout, compact_mask

    num, idx = compact_mask((base.to_dense_mask() | sinks) & dense)
    return BlockLayout(num, idx, base.block_m, base.block_n, base.seqlen_q, base.seqlen_kv, validate=False)
