"""Train the block gate by self-distillation from the frozen model's own attention.

1. **Capture** (:func:`collect_training_data`): one forward pass per sample with the post-RoPE
   Q/K of every attention layer recorded (:func:`sparseattn.integrations.capture.capture_qkv`, kept
   on the model's device for the duration of one sample only). Per layer the pooled gate features
   (:func:`sparseattn.gate.model.pooled_features`) and the **target** — the exact block attention
   mass of the dense softmax attention, normalised per query block
   (:func:`sparseattn.predictors.oracle.exact_block_mass`, computed blockwise over key chunks, so
   ``N × N`` is never materialised and 8K–32K tokens fit) — are kept; Q/K are dropped. What is kept
   per layer and sample is ``H·Mb·Nb`` target values plus the pooled features (at 32K tokens and
   64-token blocks: 512 × 512 per head).
2. **Fit** (:func:`fit_gate`): all layers at once (the layers' weights are stacked, so a step is a
   few batched matmuls), loss ``KL(target ‖ softmax(gate scores))`` over the allowed (causal)
   blocks of every query-block row, averaged over rows, heads, samples and layers; Adam. The model
   itself is frozen (never part of the optimisation).

The initial weights reproduce mean_sim's ``"mean"`` block score (see
:meth:`sparseattn.gate.model.GateWeights.init`), so the first logged loss is the KL of that
training-free score and the curve shows what training adds.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import torch

from sparseattn._validation import check_token_ids_list, fail
from sparseattn.gate.model import BIAS_BUCKETS, GateWeights, bias_bucket_index, extend_bias, gate_scores, pooled_features

#: default L2 pull toward the initial weights (chosen on SmolLM2-135M at 4K; docs/GATE.md "Training on more text")
DEFAULT_WEIGHT_DECAY = 50.0

__all__ = ["DEFAULT_WEIGHT_DECAY", "attention_scale", "layer_training_data", "collect_training_data", "kl_loss",
           "fit_gate", "train_gate", "plot_loss"]


def attention_scale(model: Any, head_dim: int) -> float:
    """The model's softmax scale: ``query_pre_attn_scalar ** -0.5`` when its config sets one (Gemma), else ``D ** -0.5``."""
    conf = getattr(model, "config", model)
    get_text = getattr(conf, "get_text_config", None)
    if callable(get_text):
        try:
            conf = get_text()
        except TypeError:  # pragma: no cover
            pass
    qs = getattr(conf, "query_pre_attn_scalar", None)
    if isinstance(qs, (int, float)) and not isinstance(qs, bool) and qs > 0:
        return float(qs) ** -0.5
    return float(head_dim) ** -0.5


def layer_training_data(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int, scale: float | None = None,
                        chunk_blocks: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q̄ [B, H, Mb, D], k̃ [B, H_kv, Nb, 3D], target [B, H, Mb, Nb])`` of one layer, float32, on q's device."""
    from sparseattn.predictors.oracle import exact_block_mass

    q_mean, k_feat = pooled_features(q, k, block_m, block_n)
    target = exact_block_mass(q, k, causal=True, block_m=block_m, block_n=block_n, scale=scale,
                              chunk_blocks=chunk_blocks)
    return q_mean, k_feat, target


def collect_training_data(model: torch.nn.Module, input_ids_list: list[torch.Tensor], *, layers: list[int] | None = None,
                          block_m: int = 64, block_n: int = 64, device: Any = None, progress: bool = True
                          ) -> dict[str, Any]:
    """Capture every sample once and keep, per layer, the gate features and the exact block-mass target.

    Returns:
        ``{"layers": [...], "kv_heads": int, "head_dim": int, "groups": {length: (qf, kf, tgt)}}`` with
        ``qf`` ``[L, S, H, Mb, D]``, ``kf`` ``[L, S, H_kv, Nb, 3D]``, ``tgt`` ``[L, S, H, Mb, Nb]``
        (float32 on ``device``, default the model's device), samples grouped by length.
    """
    from tqdm.auto import tqdm

    from sparseattn.integrations.capture import capture_qkv
    from sparseattn.models.layers import require_attention_layers

    fn = "collect_training_data"
    check_token_ids_list(fn, input_ids_list)
    all_layers = require_attention_layers(fn, model)
    layers = list(all_layers) if layers is None else sorted({int(x) for x in layers})
    bad = [li for li in layers if li not in all_layers]
    if bad:
        raise fail(fn, "layers", "name layers the model does not have", f"indices in {all_layers}", bad)
    mdev = next(model.parameters()).device
    dev = torch.device(device) if device is not None else mdev
    per_len: dict[int, list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {}
    shape: tuple[int, int] | None = None
    scale: float | None = None
    bar = tqdm(input_ids_list, desc="capture", unit="sample", disable=not progress, file=sys.stderr)
    for ids in bar:
        ids = ids if ids.dim() == 2 else ids[None]
        with torch.no_grad():
            with capture_qkv(model, layers, device=None) as cap:
                model(ids.to(mdev), use_cache=False)
            rows = []
            for li in layers:
                q, k = cap[li]["q"], cap[li]["k"]
                if shape is None:
                    shape = (int(k.shape[1]), int(q.shape[-1]))
                    scale = attention_scale(model, int(q.shape[-1]))
                rows.append(tuple(t.to(dev) for t in layer_training_data(q, k, block_m=block_m, block_n=block_n,
                                                                          scale=scale)))
                cap[li].clear()  # free this layer's Q/K/V now
        per_len.setdefault(int(ids.shape[-1]), []).append(rows)  # type: ignore[arg-type]
    bar.close()
    if shape is None:  # pragma: no cover - input_ids_list is non-empty (checked above)
        raise fail(fn, "input_ids_list", "captured nothing", "prefill forward passes", "no captured layer")
    groups = {}
    for n, samples in per_len.items():
        qf = torch.stack([torch.cat([s[li][0] for s in samples], 0) for li in range(len(layers))])
        kf = torch.stack([torch.cat([s[li][1] for s in samples], 0) for li in range(len(layers))])
        tg = torch.stack([torch.cat([s[li][2] for s in samples], 0) for li in range(len(layers))])
        groups[n] = (qf, kf, tg)
    return {"layers": layers, "kv_heads": shape[0], "head_dim": shape[1], "groups": groups,
            "block_m": block_m, "block_n": block_n, "scale": scale}


def kl_loss(scores: torch.Tensor, target: torch.Tensor, region: torch.Tensor, neg_entropy: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Per-row ``KL(target ‖ softmax(scores over the allowed blocks))`` ``[..., Mb]`` (0 for rows with no allowed block).

    ``neg_entropy``: precomputed ``Σ t log t`` per row (a constant of the targets).
    """
    logp = torch.log_softmax(scores.masked_fill(~region, float("-inf")), dim=-1)
    logp = logp.masked_fill(~region, 0.0)
    if neg_entropy is None:
        neg_entropy = torch.where(target > 0, target * torch.log(target.clamp_min(1e-38)), 0.0).sum(-1)
    kl = neg_entropy - (target * logp).sum(-1)
    return kl.masked_fill(~region.any(-1), 0.0)


def fit_gate(data: dict[str, Any], *, d_gate: int = 64, steps: int = 300, lr: float = 3e-3, batch: int = 4,
             seed: int = 0, progress: bool = True, init: GateWeights | None = None,
             on_step: Callable[[int, float], None] | None = None,
             val_data: dict[str, Any] | None = None, position_bias: bool = True, weight_decay: float = DEFAULT_WEIGHT_DECAY,
             val_every: int = 0, keep_best: bool = False) -> tuple[GateWeights, dict[str, Any]]:
    """Fit the gate's projections to the targets of :func:`collect_training_data` (see module docstring).

    Args:
        data: from :func:`collect_training_data`.
        d_gate: projection size.
        steps: Adam steps.
        lr: learning rate.
        batch: samples per step and length group (a random subset; all when fewer).
        seed: initialisation and sampling seed.
        init: start from these weights instead of the mean_sim-equivalent initialisation.
        val_data: held-out samples (same layers and blocks) whose loss is reported before and after
            training (``val_initial_loss`` / ``val_final_loss``), never trained on.
        position_bias: learn the per-head position bias (sink and block-distance buckets,
            :func:`sparseattn.gate.model.bias_bucket_index`) as well (default True). With ``init`` it is
            ignored: the bias is trained exactly when ``init`` has one.
        weight_decay: L2 penalty ``weight_decay · mean((W − W_init)²)`` per projection, pulling it toward the
            starting weights (the training-free score unless ``init`` is given; 0 = off; default :data:`DEFAULT_WEIGHT_DECAY`, the best of 0 / 1 / 10 /
            50 / 200 for held-out KL on SmolLM2-135M at 4K, docs/GATE.md).
        val_every: also evaluate the held-out loss every this many steps (``val_loss`` in the history;
            0 = only before and after). Needs ``val_data``.
        keep_best: return the weights of the evaluated step with the lowest held-out loss (early
            stopping; ``best_step`` in the history) instead of the last. Needs ``val_data`` and ``val_every``.

    Returns:
        ``(weights, history)``; history holds ``loss`` (per step, mean over layers), ``initial_loss`` /
        ``final_loss`` (over all samples, per layer and mean) and ``seconds``.
    """
    from tqdm.auto import tqdm

    from sparseattn.predictors._common import causal_region

    fn = "fit_gate"
    for name, v in (("d_gate", d_gate), ("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise fail(fn, name, "must be a positive integer", "an int > 0", repr(v))
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise fail(fn, "lr", "must be a positive finite number", "e.g. 3e-3", repr(lr))
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (0 <= weight_decay < math.inf):
        raise fail(fn, "weight_decay", "must be a finite number >= 0", "e.g. 0 or 1.0", repr(weight_decay))
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 0:
        raise fail(fn, "val_every", "must be an int >= 0", "e.g. 0 or 25", repr(val_every))
    if keep_best and (val_data is None or val_every == 0):
        raise fail(fn, "keep_best", "needs held-out data evaluated during training", "val_data and val_every > 0",
                   f"val_data {'given' if val_data is not None else 'None'}, val_every {val_every}")
    layers, bm, bn = data["layers"], data["block_m"], data["block_n"]
    groups = data["groups"]
    first = next(iter(groups.values()))
    dev = first[0].device
    heads = int(first[0].shape[2])
    w0 = init if init is not None else GateWeights.init(layers, data["kv_heads"], data["head_dim"], d_gate,
                                                        block_m=bm, block_n=bn, seed=seed,
                                                        heads=heads if position_bias else None)
    wq = torch.nn.Parameter(w0.wq.to(dev, torch.float32).clone())
    wk = torch.nn.Parameter(w0.wk.to(dev, torch.float32).clone())
    params = [wq, wk]
    bias = None
    if w0.bias is not None:
        if tuple(w0.bias.shape) != (len(layers), heads, BIAS_BUCKETS):
            raise fail(fn, "init.bias", "does not match the data", f"[{len(layers)}, {heads}, {BIAS_BUCKETS}]",
                       list(w0.bias.shape))
        bias = torch.nn.Parameter(w0.bias.to(dev, torch.float32).clone())
        params.append(bias)
    wq0, wk0 = wq.detach().clone(), wk.detach().clone()
    opt = torch.optim.Adam(params, lr=lr)

    def prepare(grp: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for n, (qf, kf, tg) in grp.items():
            qf, kf, tg = qf.to(dev), kf.to(dev), tg.to(dev)
            region = causal_region(n, n, bm, bn, True, dev)
            neg_ent = torch.where(tg > 0, tg * torch.log(tg.clamp_min(1e-38)), 0.0).sum(-1)
            out.append((qf, kf, tg, region, neg_ent, bias_bucket_index(n, n, bm, bn, dev)))
        return out

    prepared = prepare(groups)
    val_prepared = None
    if val_data is not None:
        if val_data["layers"] != layers or (val_data["block_m"], val_data["block_n"]) != (bm, bn):
            raise fail(fn, "val_data", "has other layers or block sizes than data", f"layers {layers}, blocks {bm}x{bn}",
                       f"layers {val_data['layers']}, blocks {val_data['block_m']}x{val_data['block_n']}")
        val_prepared = prepare(val_data["groups"])

    def layer_losses(idx_per_group: list[torch.Tensor | None], sets: list[tuple[torch.Tensor, ...]] | None = None
                     ) -> torch.Tensor:
        sets = prepared if sets is None else sets
        total = torch.zeros(len(layers), device=dev)
        count = 0
        for (qf, kf, tg, region, ne, bidx), idx in zip(sets, idx_per_group):
            if idx is not None:
                qf, kf, tg, ne = qf[:, idx], kf[:, idx], tg[:, idx], ne[:, idx]
            b = None if bias is None else bias[:, None][..., bidx]  # [L, 1, H, Mb, Nb]
            s = gate_scores(qf, kf, wq[:, None], wk[:, None], b)  # [L, S, H, Mb, Nb]
            kl = kl_loss(s, tg, region, ne)  # [L, S, H, Mb]
            rows = region.any(-1).sum()
            total = total + kl.sum((1, 2, 3)) / (kl.shape[1] * kl.shape[2] * rows)
            count += 1
        return total / count

    with torch.no_grad():
        initial = layer_losses([None] * len(prepared))
        val_initial = None if val_prepared is None else layer_losses([None] * len(val_prepared), val_prepared)
    g = torch.Generator().manual_seed(seed)
    hist: list[float] = []
    val_hist: list[tuple[int, float]] = []
    if val_every and val_initial is not None:
        val_hist.append((0, float(val_initial.mean())))
    best: tuple[float, int, list[torch.Tensor]] | None = None
    if keep_best and val_initial is not None:
        best = (float(val_initial.mean()), 0, [p.detach().clone() for p in params])
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train-gate", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        idx = []
        for qf, *_ in prepared:
            S = qf.shape[1]
            idx.append(None if S <= batch else torch.randperm(S, generator=g)[:batch].to(dev))
        loss = layer_losses(idx).mean()
        obj = loss
        if weight_decay:
            obj = loss + weight_decay * (((wq - wq0) ** 2).mean() + ((wk - wk0) ** 2).mean())
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        val = float(loss.detach())  # training loop: one host read per step for the curve is intended
        hist.append(val)
        if on_step is not None:
            on_step(step, val)
        if val_every and val_prepared is not None and (step + 1) % val_every == 0:
            with torch.no_grad():
                v = float(layer_losses([None] * len(val_prepared), val_prepared).mean())
            val_hist.append((step + 1, v))
            if best is not None and v < best[0]:
                best = (v, step + 1, [p.detach().clone() for p in params])
            bar.set_postfix(kl=f"{val:.4f}", val=f"{v:.4f}")
        else:
            bar.set_postfix(kl=f"{val:.4f}")
    bar.close()
    if best is not None:
        with torch.no_grad():
            for p, b0 in zip(params, best[2]):
                p.copy_(b0)
    with torch.no_grad():
        final = layer_losses([None] * len(prepared))
        val_final = None if val_prepared is None else layer_losses([None] * len(val_prepared), val_prepared)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in hist):
        raise fail(fn, "training", "diverged (the loss became NaN or infinite)", "a finite loss (try a smaller --lr)",
                   f"losses {hist[-3:]}")
    # the farthest distance bucket the training data reached (its region's largest bucket index): later buckets
    # got no gradient and take its value (extend_bias), so prompts longer than the training ones stay monotone --
    # unless an ``init`` gate brought values for them (trained on longer prompts before), which are kept
    last = max(int(b[r].max()) for *_, r, _ne, b in prepared)
    out_bias = None if bias is None else bias.detach().cpu()
    if out_bias is not None and (init is None or not bool(w0.bias[..., last + 1:].any())):
        out_bias = extend_bias(out_bias, last)
    weights = GateWeights(list(layers), wq.detach().cpu(), wk.detach().cpu(), bm, bn, {}, out_bias)
    history = {"loss": hist, "initial_loss": float(initial.mean()), "final_loss": float(final.mean()),
               "position_bias": bias is not None, "weight_decay": float(weight_decay), "val_every": val_every,
               "keep_best": bool(keep_best), "val_loss": val_hist, "best_step": None if best is None else best[1],
               "bias_buckets_trained": last + 1 if bias is not None else None,
               "initial_loss_per_layer": {str(li): float(x) for li, x in zip(layers, initial.cpu())},
               "final_loss_per_layer": {str(li): float(x) for li, x in zip(layers, final.cpu())},
               "seconds": seconds, "steps": steps, "lr": float(lr), "batch": batch, "d_gate": d_gate, "seed": seed}
    if val_initial is not None and val_final is not None:
        history.update(val_initial_loss=float(val_initial.mean()), val_final_loss=float(val_final.mean()),
                       val_initial_loss_per_layer={str(li): float(x) for li, x in zip(layers, val_initial.cpu())},
                       val_final_loss_per_layer={str(li): float(x) for li, x in zip(layers, val_final.cpu())})
    return weights, history


def train_gate(model: torch.nn.Module, input_ids_list: list[torch.Tensor], *, layers: list[int] | None = None,
               d_gate: int = 64, block_m: int = 64, block_n: int = 64, steps: int = 300, lr: float = 3e-3,
               batch: int = 4, seed: int = 0, progress: bool = True, val_ids_list: list[torch.Tensor] | None = None,
               position_bias: bool = True, weight_decay: float = DEFAULT_WEIGHT_DECAY, val_every: int = 0,
               keep_best: bool = False
               ) -> tuple[GateWeights, dict[str, Any]]:
    """Capture, fit and describe a gate for ``model`` (frozen). Returns ``(weights, history)``; ``weights.meta``
    holds the fingerprint and the training details (save with :func:`sparseattn.gate.store.save_gate`).
    ``val_ids_list``: held-out samples whose KL is reported before / after training (not trained on).
    ``position_bias`` / ``weight_decay`` / ``val_every`` / ``keep_best``: as :func:`fit_gate`."""
    from sparseattn.gate.store import gate_meta

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        data = collect_training_data(model, input_ids_list, layers=layers, block_m=block_m, block_n=block_n,
                                     progress=progress)
        val = None
        if val_ids_list:
            val = collect_training_data(model, list(val_ids_list), layers=data["layers"], block_m=block_m,
                                        block_n=block_n, progress=progress)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    capture_s = time.perf_counter() - t0
    with torch.enable_grad():
        weights, hist = fit_gate(data, d_gate=d_gate, steps=steps, lr=lr, batch=batch, seed=seed, progress=progress,
                                 val_data=val, position_bias=position_bias, weight_decay=weight_decay,
                                 val_every=val_every if val is not None else 0, keep_best=keep_best)
    hist["capture_seconds"] = capture_s
    hist["seq_len"] = sorted(int(n) for n in data["groups"])
    hist["samples"] = len(input_ids_list)
    hist["val_samples"] = len(val_ids_list or [])
    hist["softmax_scale"] = data["scale"]
    try:
        hist["device"] = str(next(model.parameters()).device)
    except StopIteration:  # pragma: no cover
        hist["device"] = "cpu"
    training = {k: v for k, v in hist.items() if k != "loss"}
    training["loss_every_10"] = [round(x, 6) for x in hist["loss"][::10]]
    weights.meta = gate_meta(weights, model=model, training=training)
    return weights, hist


def plot_loss(history: dict[str, Any], path: Any, *, title: str = "") -> Any:
    """Loss curve PNG (KL per step, with the initial mean_sim-equivalent loss as a dashed line)."""
    from pathlib import Path

    from sparseattn.eval.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(range(1, len(history["loss"]) + 1), history["loss"], lw=1.2, label="training batch KL")
    ax.axhline(history["initial_loss"], color="gray", ls="--", lw=0.8, label="initial (mean_sim-like score)")
    ax.axhline(history["final_loss"], color="tab:green", ls=":", lw=0.8, label="final (all training samples)")
    if len(history.get("val_loss") or []) > 1:
        xs, ys = zip(*history["val_loss"])
        ax.plot(xs, ys, color="tab:red", marker=".", lw=1.0, label=f"held-out KL (initial {ys[0]:.3g})")
        if history.get("best_step") is not None:
            ax.axvline(history["best_step"], color="tab:red", ls=":", lw=0.8, label=f"kept: step {history['best_step']}")
    elif history.get("val_final_loss") is not None:
        ax.axhline(history["val_final_loss"], color="tab:red", ls="-.", lw=0.8,
                   label=f"final, held-out (initial {history['val_initial_loss']:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(target || gate), nats per query block")
    if min(history["loss"] + [history["final_loss"]]) > 0:
        ax.set_yscale("log")  # the initial KL is ~50x the trained one; linear would flatten the curves
    ax.set_title(title or "block gate training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
