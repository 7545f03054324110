"""Train the block gate on the windows around held-out ones, with one capture shared by many fits.

For a held-out evaluation on windows in the middle of a text source (``benchmarks/tune_frontier.py --skip S
--samples n`` scores windows ``S … S+n−1``), train on the windows *around* them and on the half-offset windows
(starting half a window later) inside the training regions, so a small corpus gives about twice the training
windows. ``sparseattn train-gate --windows 0-7,12-16 --val-windows 17,18 --half-offsets`` does the same in one
command; this script splits capture and fit so that fit variants (weight decay, steps, bias on/off) reuse one
capture:

    PYTHONPATH=src python benchmarks/gate_more_text.py capture --text-dir ../shared/data/essays \\
        --seq-len 4096 --windows 0-7,12-18 --half-offsets --out runs/gate_data
    PYTHONPATH=src python benchmarks/gate_more_text.py fit --data runs/gate_data \\
        --train w00-w07,w12-w16,h00-h06,h12-h15 --val w17,w18 --steps 500 --weight-decay 50 --out gate.safetensors

``capture`` writes one safetensors file per window (``wNN`` = window NN, ``hNN`` = the window starting half a
window after window NN's start, as :func:`sparseattn.eval.texts.pick_windows` builds them), each holding the gate
features and the exact block-mass target of every layer (:func:`sparseattn.gate.train.collect_training_data`)
and, in its metadata, the documents the window spans. It skips windows already written (resumable). ``fit`` runs
:func:`sparseattn.gate.train.fit_gate` on the named windows and writes the gate file (with the training
documents in its metadata, so ``--exclude-gate-texts`` works), ``<out>.json`` and ``<out>.loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _names(text: str) -> list[str]:
    """``w00-w07,h03`` -> ['w00', ..., 'w07', 'h03']."""
    out: list[str] = []
    for part in [p for p in text.split(",") if p]:
        lo, _, hi = part.partition("-")
        if hi:
            out.extend(f"{lo[0]}{i:02d}" for i in range(int(lo[1:]), int(hi[1:]) + 1))
        else:
            out.append(lo)
    return out


def capture(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from sparseattn.cli._args import index_ranges
    from sparseattn.eval.texts import documents_for, pick_windows, token_samples
    from sparseattn.gate.train import collect_training_data
    from sparseattn.models import load
    from sparseattn.tuning.store import model_fingerprint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load(args.model, dtype=torch.float32, device=args.device)
    want = index_ranges(args.windows)
    docs, _ = documents_for(None, args.text_dir)
    ids, names = token_samples(docs, tok, seq_len=args.seq_len, samples=max(want) + 1)
    bos = getattr(tok, "bos_token_id", None) is not None
    picked, picked_names, labels = pick_windows(ids, names, want, half_offsets=args.half_offsets, bos=bos)
    wins = {lab: (t, n) for lab, t, n in zip(labels, picked, picked_names)}
    fp = json.dumps(model_fingerprint(model))
    for key, (t, docs_of) in wins.items():
        p = out / f"{key}.safetensors"
        if p.exists():
            continue
        t0 = time.perf_counter()
        d = collect_training_data(model, [t], progress=False)
        qf, kf, tg = d["groups"][args.seq_len]
        tmp = p.with_suffix(".tmp")
        save_file({"qf": qf.contiguous(), "kf": kf.contiguous(), "tg": tg.contiguous()}, str(tmp),
                  metadata={"scale": repr(d["scale"]), "layers": json.dumps(d["layers"]), "fingerprint": fp,
                            "model": args.model, "seq_len": str(args.seq_len),
                            "documents": json.dumps([os.path.abspath(n) if os.path.isfile(n) else n for n in docs_of])})
        os.replace(tmp, p)
        print(f"{key}: {time.perf_counter() - t0:.0f} s ({', '.join(Path(n).name for n in docs_of)})", flush=True)
    return 0


def _load(folder: Path, keys: list[str], device: str = "cpu") -> tuple[dict, list[str], dict[str, str]]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    parts, docs, md = [], set(), {}
    for k in keys:
        p = folder / f"{k}.safetensors"
        if not p.exists():
            raise SystemExit(f"gate_more_text fit: window {k} was not captured ({p} missing)")
        parts.append(load_file(str(p)))
        with safe_open(str(p), "pt") as f:
            md = f.metadata()
        docs |= set(json.loads(md["documents"]))
    qf, kf, tg = (torch.cat([x[n] for x in parts], 1).to(device) for n in ("qf", "kf", "tg"))
    scale = md["scale"]
    data = {"layers": json.loads(md["layers"]), "kv_heads": int(kf.shape[2]), "head_dim": int(qf.shape[-1]),
            "groups": {int(md["seq_len"]): (qf, kf, tg)}, "block_m": 64, "block_n": 64,
            "scale": None if scale == "None" else float(scale)}
    return data, sorted(docs), md


def fit(args: argparse.Namespace) -> int:
    from sparseattn.eval.env import environment
    from sparseattn.gate.store import gate_meta, load_gate, save_gate
    from sparseattn.gate.train import fit_gate, plot_loss

    folder = Path(args.data)
    train, val = _names(args.train), _names(args.val)
    data, docs, md = _load(folder, train, args.device)
    vdata, vdocs, _ = _load(folder, val, args.device) if val else (None, [], None)
    t0 = time.perf_counter()
    w, h = fit_gate(data, d_gate=args.d_gate, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                    val_data=vdata, position_bias=not args.no_position_bias, weight_decay=args.weight_decay,
                    val_every=args.val_every if vdata else 0, keep_best=args.keep_best)
    training = {k: v for k, v in h.items() if k != "loss"}
    training.update(texts=docs, text_source=f"benchmarks/gate_more_text.py windows {','.join(train)}",
                    val_windows=val, val_texts=vdocs, seq_len=[int(md["seq_len"])], samples=len(train),
                    val_samples=len(val), softmax_scale=data["scale"], device=args.device, dtype="float32",
                    loss_every_10=[round(x, 6) for x in h["loss"][::10]])
    w.meta = gate_meta(w, training=training, model_name=md["model"])
    w.meta["fingerprint"] = json.loads(md["fingerprint"])
    out = save_gate(args.out, w)
    load_gate(out)
    stem = out.with_suffix("")
    plot_loss(h, f"{stem}.loss.png", title=f"{md['model']}: gate KL, {len(train)} windows x {md['seq_len']}, "
                                            f"weight decay {args.weight_decay:g}")
    Path(f"{stem}.json").write_text(json.dumps({"tool": "benchmarks/gate_more_text.py fit", "gate_file": str(out),
                                                "history": h, "train": train, "val": val, "texts": docs,
                                                "seconds": time.perf_counter() - t0,
                                                "environment": environment("cpu")}, indent=2) + "\n")
    best = f", kept step {h['best_step']}" if h.get("best_step") is not None else ""
    print(f"{out}: KL {h['initial_loss']:.4f} -> {h['final_loss']:.4f} (train), held-out "
          f"{h.get('val_initial_loss', float('nan')):.4f} -> {h.get('val_final_loss', float('nan')):.4f}{best}; "
          f"{h['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gate_more_text.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--text-dir", required=True)
    c.add_argument("--seq-len", type=int, default=4096)
    c.add_argument("--windows", required=True, help="window indices, e.g. 0-7,12-18")
    c.add_argument("--half-offsets", action="store_true", help="also the windows half a window later (hNN)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True)
    c.set_defaults(func=capture)
    f = sub.add_parser("fit")
    f.add_argument("--data", required=True)
    f.add_argument("--train", required=True, help="window names, e.g. w00-w07,h00-h06")
    f.add_argument("--val", default="", help="held-out window names")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--d-gate", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--weight-decay", type=float, default=50.0)
    f.add_argument("--val-every", type=int, default=25)
    f.add_argument("--keep-best", action="store_true")
    f.add_argument("--no-position-bias", action="store_true")
    f.add_argument("--device", default="cpu", help="where the fit runs (the captured data moves there)")
    f.add_argument("--text-dir", default=None, help="informative only")
    f.add_argument("--out", required=True)
    f.set_defaults(func=fit)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
