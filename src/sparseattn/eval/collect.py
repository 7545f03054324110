"""Capture real Q/K/V (``sparseattn collect``) and validate predictors on them (``sparseattn validate``).

Layout of a collection folder::

    <out>/len<N>/sample<i>.safetensors   tensors "layer<L>.q" (B, H, N, D), "layer<L>.k", "layer<L>.v" (B, H_kv, N, D)
    <out>/len<N>/sample<i>.json          metadata: model, sample, seq_len, layers, heads, kv_heads, head_dim,
                                         dtype, scale per layer, documents, timestamp
    <out>/len<N>/summary.json            the files, shapes and bytes of that length
    <out>/collection.json                the lengths and the command's arguments

Tensors are post-RoPE, exactly what the model's attention function receives (GQA k/v unexpanded).
Loading reads JSON and safetensors only (no code executes). Every reader of a collection
(``iter_collected``, ``validate``, ``compare --input``) resolves its path with
:func:`resolve_collection`: the collection root, one ``len<N>`` folder or one ``.safetensors`` file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail

__all__ = ["collect_qkv", "resolve_collection", "describe_collection", "collected_files", "iter_collected", "read_sample_meta", "validate_predictor",
           "validation_markdown"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect_qkv(
    out_dir: str | Path,
    *,
    model_name: str = "smollm2-135m",
    model: Any = None,
    tokenizer: Any = None,
    layers: Sequence[int] | None = None,
    lengths: Sequence[int] = (512,),
    samples: int = 1,
    text_files: Sequence[str] | None = None,
    text_dir: str | None = None,
    save_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the dense model on text samples and save post-RoPE Q/K/V of ``layers`` per sample and length.

    Args:
        out_dir: collection folder (created).
        model_name / model, tokenizer: what to run (see :func:`sparseattn.models.load`).
        layers: layer indices (default: first, middle and last).
        lengths: sequence lengths in tokens; each length takes its own ``samples`` windows of the text.
        samples: samples per length.
        text_files, text_dir: text source (default: the Python standard library's source).
        save_dtype: dtype of the saved tensors.

    Returns:
        The collection summary (also written to ``collection.json``).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from sparseattn.eval.texts import documents_for, token_samples
    from sparseattn.integrations.capture import capture_qkv
    from sparseattn.models.layers import attention_layers

    fn = "collect_qkv"
    check_positive_int(fn, "samples", samples)
    lengths = [check_positive_int(fn, "lengths", int(n)) for n in lengths]
    from sparseattn.models import model_and_tokenizer

    model, tokenizer = model_and_tokenizer(fn, model_name, model, tokenizer, dtype=dtype, device=device)
    all_layers = attention_layers(model)
    n_layers = len(all_layers)
    if layers is None:
        layers = sorted({0, n_layers // 2, n_layers - 1})
    layers = [int(x) for x in layers]
    for li in layers:
        if not 0 <= li < n_layers:
            raise fail(fn, "layers", "has an index the model does not have", f"0..{n_layers - 1}", li)
    scale_of = {i: getattr(m, "scaling", None) for i, m in all_layers}
    dev = next(model.parameters()).device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model_desc = str(model_name if model_name else getattr(cfg, "_name_or_path", type(model).__name__))
    summary: dict[str, Any] = {"model": model_desc, "created": _now(), "layers": layers, "lengths": lengths,
                               "samples": samples, "save_dtype": str(save_dtype).replace("torch.", ""), "per_length": {}}
    bar = tqdm(total=len(lengths) * samples, desc="collect", unit="sample", disable=not progress)
    # every length's prompts first: a text too short for a later length fails before anything is captured
    prompts = {}
    for n in lengths:
        docs, source = documents_for(text_files, text_dir)  # an iterator: a fresh one per length
        prompts[n] = token_samples(docs, tokenizer, seq_len=n, samples=samples)
    for n in lengths:
        ids_list, names = prompts[n]
        ldir = out / f"len{n}"
        ldir.mkdir(exist_ok=True)
        files = []
        for si, ids in enumerate(ids_list):
            t0 = time.perf_counter()
            with torch.no_grad(), capture_qkv(model, layers) as cap:
                model(ids.to(dev), use_cache=False, logits_to_keep=1)
            tensors = {f"layer{li}.{r}": cap[li][r].to(save_dtype).contiguous() for li in layers for r in ("q", "k", "v")}
            q0, k0 = cap[layers[0]]["q"], cap[layers[0]]["k"]
            meta = {"model": model_desc, "sample": si, "seq_len": n, "layers": layers, "heads": int(q0.shape[1]),
                    "kv_heads": int(k0.shape[1]), "head_dim": int(q0.shape[3]), "batch": int(q0.shape[0]),
                    "dtype": str(save_dtype).replace("torch.", ""), "scale": {str(li): scale_of[li] for li in layers},
                    "documents": names[si][:20], "text_source": source, "timestamp": _now(),
                    "forward_s": time.perf_counter() - t0}
            st = ldir / f"sample{si}.safetensors"
            save_file(tensors, str(st), metadata={"sparseattn": json.dumps({k: meta[k] for k in ("model", "seq_len", "sample")})})
            (ldir / f"sample{si}.json").write_text(json.dumps(meta, indent=2))
            files.append({"tensors": st.name, "metadata": f"sample{si}.json", "bytes": st.stat().st_size})
            bar.update(1)
        lsum = {"model": model_desc, "seq_len": n, "samples": samples, "layers": layers,
                "q_shape": list(q0.shape), "kv_shape": list(k0.shape), "files": files, "text_source": source,
                "timestamp": _now()}
        (ldir / "summary.json").write_text(json.dumps(lsum, indent=2))
        summary["per_length"][str(n)] = {"folder": ldir.name, "files": len(files),
                                         "bytes": sum(f["bytes"] for f in files)}
    bar.close()
    from sparseattn.eval.env import environment

    summary["environment"] = environment(dev)
    (out / "collection.json").write_text(json.dumps(summary, indent=2))
    return summary


_EXPECTED_FILE = "a sample<i>.safetensors written by sparseattn collect"
_EXPECTED_META = "a sample<i>.json written by sparseattn collect"
_META_REQUIRED = ("seq_len", "layers", "heads", "kv_heads", "head_dim")


_COLLECTION_EXPECTED = ("a collection folder (with len<N>/ folders), one len<N> folder or one sample<i>.safetensors "
                        "file made by sparseattn collect")
_LEN_DIR = re.compile(r"len(\d+)")


def _length_of_folder(folder: Path) -> int | None:
    m = _LEN_DIR.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def _order(f: Path) -> tuple[int, str, int, str]:
    """Sort key: length folder (numeric), then sample number (numeric: sample2 before sample10), then name."""
    n = _length_of_folder(f.parent)
    m = re.fullmatch(r"sample(\d+)", f.stem)
    return (n if n is not None else -1, str(f.parent), int(m.group(1)) if m else -1, f.name)


def resolve_collection(path: str | os.PathLike, func: str = "resolve_collection") -> list[Path]:
    """The Q/K/V files a collection path stands for; the one resolver every reader of a collection uses.

    ``path`` may be

    * a collection root written by ``sparseattn collect --out ROOT`` (its ``len<N>/*.safetensors``),
    * one length folder ``ROOT/len<N>`` (or any folder holding ``.safetensors`` files directly),
    * one ``.safetensors`` file.

    Files are ordered by length (the ``len<N>`` folder, numerically), then sample number.
    :func:`describe_collection` says in one line what was found.

    Raises:
        ValueError: ``<func>: ...`` for a path that is not a path, does not exist, is a file other than
            ``.safetensors`` (a ``sample<i>.json`` / ``collection.json`` names the path to use instead),
            or a folder without collected tensors (an interrupted collection, and a folder that holds
            collections one level down, are named as such).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail(func, "path", "must be a path", _COLLECTION_EXPECTED, repr(path))
    p = Path(path).expanduser()
    if not p.exists():
        parent = p.parent
        hint = "" if parent.is_dir() else f" (its folder {parent} does not exist either)"
        raise fail(func, f"path {p}", f"does not exist{hint}", _COLLECTION_EXPECTED, "no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return [p]
        if p.suffix == ".json":
            other = p.with_suffix(".safetensors")
            use = other if other.is_file() else (p.parent if p.name in ("collection.json", "summary.json") else None)
            hint = f" (pass {use} instead)" if use is not None else ""
            raise fail(func, f"path {p}", f"is a metadata file, not Q/K/V tensors{hint}", _COLLECTION_EXPECTED,
                       "a .json file")
        raise fail(func, f"path {p}", "is not a .safetensors file", _COLLECTION_EXPECTED,
                   f"a {p.suffix or 'suffix-less'} file")
    if not p.is_dir():
        raise fail(func, f"path {p}", "is neither a file nor a folder", _COLLECTION_EXPECTED, "a special file")
    files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if not files:
        len_dirs = sorted((d for d in p.iterdir() if d.is_dir() and _length_of_folder(d) is not None),
                          key=_length_of_folder)
        files = [f for d in len_dirs for f in d.glob("*.safetensors") if f.is_file()]
        if len_dirs and not files:
            raise fail(func, f"folder {p}", "has length folders without any .safetensors file (an interrupted or "
                       "failed collect?)", _COLLECTION_EXPECTED,
                       f"{len(len_dirs)} empty length folder{'s' if len(len_dirs) > 1 else ''} "
                       f"({', '.join(d.name for d in len_dirs[:6])})")
    if not files:
        below = sorted({str(f.parent.parent.relative_to(p)) for f in p.glob("*/len*/*.safetensors")
                        if _length_of_folder(f.parent) is not None})
        if below:
            raise fail(func, f"folder {p}", f"holds collections one level down, not one itself (pass one of: "
                       f"{', '.join(str(p / b) for b in below[:6])})", _COLLECTION_EXPECTED,
                       f"{len(below)} collection folder{'s' if len(below) > 1 else ''} inside it")
        entries = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise fail(func, f"folder {p}", "holds no .safetensors file (nor len<N>/ folders with them)",
                   _COLLECTION_EXPECTED,
                   f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})" if entries else "an empty folder")
    return sorted(files, key=_order)


def describe_collection(files: Sequence[Path], path: str | os.PathLike, func: str = "") -> str:
    """One line saying what :func:`resolve_collection` found, e.g.
    ``"compare: found 4 files in 2 length folders (len64, len128) under qkv"``."""
    lead = f"{func}: " if func else ""
    n = len(files)
    if n == 1 and Path(path).expanduser().is_file():
        return f"{lead}found 1 file ({files[0]})"
    folders = list(dict.fromkeys(f.parent for f in files))  # in resolved (length) order
    plural = "s" if n != 1 else ""
    if len(folders) == 1 and folders[0] == Path(path).expanduser():
        return f"{lead}found {n} file{plural} in {folders[0]}"
    names = ", ".join(d.name for d in folders[:8]) + (", ..." if len(folders) > 8 else "")
    return (f"{lead}found {n} file{plural} in {len(folders)} length folder{'s' if len(folders) != 1 else ''} "
            f"({names}) under {path}")


def collected_files(func: str, path: str | Path) -> list[Path]:
    """:func:`resolve_collection` with the arguments the other way round (kept for older callers)."""
    return resolve_collection(path, func)


def read_sample_meta(func: str, path: str | Path) -> dict[str, Any]:
    """Read and check a ``sample<i>.json`` written by :func:`collect_qkv` (JSON only, no code runs).

    Required keys: ``seq_len``, ``layers``, ``heads``, ``kv_heads``, ``head_dim`` (integers, layers a
    non-empty list); optional ``sample``, ``batch`` (integers) and ``scale`` (an object mapping
    layer numbers to a finite positive number or null).

    Raises:
        ValueError: missing / empty / truncated / non-JSON file, a JSON value that is not an
            object, a missing key, or a value of the wrong type (NaN where a number is needed).
    """
    from sparseattn.errors import check_meta_int, check_meta_number, read_json_file, require_keys

    meta = read_json_file(func, path, "metadata", expected=_EXPECTED_META)
    label = f"metadata {Path(path)}"
    require_keys(func, meta, _META_REQUIRED, label)
    check_meta_int(func, label, "seq_len", meta["seq_len"], minimum=1)
    for key in ("heads", "kv_heads", "head_dim"):
        check_meta_int(func, label, key, meta[key], minimum=1)
    for key in ("sample", "batch"):
        if key in meta:
            check_meta_int(func, label, key, meta[key], minimum=1 if key == "batch" else 0)
    layers = meta["layers"]
    if not isinstance(layers, list) or not layers:
        raise fail(func, f"{label} key 'layers'", "must be a non-empty list of layer indices", "e.g. [0, 15, 29]",
                   repr(layers))
    for li in layers:
        check_meta_int(func, label, "layers", li)
    scale = meta.get("scale")
    if scale is not None:
        if not isinstance(scale, dict):
            raise fail(func, f"{label} key 'scale'", "must be an object of layer -> number", '{"0": 0.125, ...}',
                       repr(scale))
        for li, val in scale.items():
            check_meta_number(func, label, f"scale.{li}", val, positive=True, allow_none=True)
    return meta


def check_qkv_group(func: str, file: Path, layer: int, q: Any, k: Any, v: Any,
                    meta: dict[str, Any] | None = None) -> None:
    """Shapes and dtypes of one layer's captured tensors (and their agreement with the metadata)."""
    names = {"q": q, "k": k, "v": v}
    for role, t in names.items():
        if t is None:
            continue
        label = f"tensor 'layer{layer}.{role}' of {file}"
        if t.dim() != 4:
            raise fail(func, label, "has the wrong rank", "4 dims (B, H, N, D)", f"shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise fail(func, label, "has the wrong dtype", "a floating dtype (float32, float16, bfloat16)",
                       str(t.dtype).replace("torch.", ""))
        if t.numel() == 0:
            raise fail(func, label, "is empty", "all dims > 0", f"shape {tuple(t.shape)}")
    B, H, N, D = q.shape
    for role, t in (("k", k), ("v", v)):
        if t is None:
            continue
        Bk, Hk, Nk, Dk = t.shape
        if (Bk, Nk, Dk) != (B, N, D) or H % Hk:
            raise fail(func, f"tensor 'layer{layer}.{role}' of {file}", f"does not fit layer{layer}.q",
                       f"(B, H_kv, N, D) = ({B}, a divisor of {H}, {N}, {D})", f"shape {tuple(t.shape)}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise fail(func, f"tensor 'layer{layer}.v' of {file}", "differs in shape from k", f"shape {tuple(k.shape)}",
                   f"shape {tuple(v.shape)}")
    if meta is not None:
        want = {"seq_len": N, "heads": H, "kv_heads": int(k.shape[1]), "head_dim": D}
        for key, got in want.items():
            if key in meta and meta[key] != got:
                raise fail(func, f"metadata of {file} key {key!r}", f"disagrees with the tensors of layer {layer}",
                           f"{key}={got} (from the tensors)", f"{key}={meta[key]!r}")


def iter_collected(path: str | Path, *, device: str | torch.device = "cpu",
                   lengths: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"q", "k", "v", "layer", "seq_len", "sample", "scale", "file", "meta"}`` from a collection.

    ``path`` is a collection folder, one ``len<N>`` folder, or one ``sample<i>.safetensors`` file
    (its ``.json`` beside it). Everything read is checked (JSON and safetensors only, no code
    runs): a missing, empty, truncated or corrupt file, metadata of the wrong JSON type or with
    missing or wrong-typed keys, a tensor missing for a layer the metadata lists, and tensors of
    the wrong rank, dtype or shape all raise ``ValueError`` naming the file. A sample without its
    ``.json`` is read from the tensors alone.
    """
    from sparseattn.errors import load_safetensors_file

    fn = "iter_collected"
    for f in resolve_collection(path, fn):
        meta_path = f.with_suffix(".json")
        meta = read_sample_meta(fn, meta_path) if meta_path.exists() else {}
        n_meta = meta.get("seq_len")
        if lengths is not None and n_meta is not None and n_meta not in lengths:
            continue
        tensors = load_safetensors_file(fn, f, "tensor file", device=str(device), expected=_EXPECTED_FILE)
        if meta:
            found = [int(x) for x in meta["layers"]]
            for li in found:
                for r in ("q", "k", "v"):
                    if f"layer{li}.{r}" not in tensors:
                        have = sorted(tensors)[:6]
                        raise fail(fn, f"tensor file {f}", f"is missing tensor 'layer{li}.{r}' (its metadata lists layer {li})",
                                   f"tensors layer{li}.q/k/v", f"tensors {have}{'...' if len(tensors) > 6 else ''}")
        else:
            found = sorted({int(k.split(".")[0][5:]) for k in tensors
                            if k.startswith("layer") and k.split(".")[0][5:].isdigit()})
            if not found:
                raise fail(fn, f"tensor file {f}", "holds no layer<L>.q/k/v tensors", "tensors named layer<L>.q, .k, .v",
                           f"tensors {sorted(tensors)[:6]}")
        for li in found:
            if layers is not None and li not in layers:
                continue
            q, k, v = (tensors.get(f"layer{li}.{r}") for r in ("q", "k", "v"))
            missing = [r for r, t in (("q", q), ("k", k), ("v", v)) if t is None]
            if missing:
                raise fail(fn, f"tensor file {f}", f"is missing tensor 'layer{li}.{missing[0]}'",
                           f"tensors layer{li}.q/k/v", f"only layer{li}.{'/'.join(r for r in 'qkv' if r not in missing)}")
            check_qkv_group(fn, f, li, q, k, v, meta or None)
            n = int(q.shape[2])
            if lengths is not None and n not in lengths:
                continue
            yield {"q": q, "k": k, "v": v, "layer": li, "seq_len": n, "sample": meta.get("sample"),
                   "scale": (meta.get("scale") or {}).get(str(li)), "file": str(f), "meta": meta}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _target(cfg: Any) -> dict[str, Any] | None:
    """The sparsity a predictor's config asks for, when it states one (else None)."""
    if cfg is None:
        return None
    if _num(getattr(cfg, "target_sparsity", None)):
        return {"target_sparsity": float(cfg.target_sparsity), "from": "config.target_sparsity"}
    if _num(getattr(cfg, "target_density", None)):
        return {"target_sparsity": 1.0 - float(cfg.target_density), "from": "1 - config.target_density"}
    if getattr(cfg, "pattern", None) == "random" and _num(getattr(cfg, "density", None)):
        return {"target_sparsity": 1.0 - float(cfg.density), "from": "1 - config.density (random pattern)"}
    topk = getattr(cfg, "topk", None)
    if _num(topk) and 0 < float(topk) <= 1:
        return {"target_sparsity": 1.0 - float(topk), "from": "1 - config.topk"}
    fr = [getattr(cfg, a, None) for a in ("sink_fraction", "window_fraction", "top_fraction")]
    if all(_num(x) for x in fr):
        return {"target_sparsity": max(0.0, 1.0 - float(sum(fr))),
                "from": "1 - (sink_fraction + window_fraction + top_fraction), nominal"}
    return None


def _timed(f: Any, repeats: int, cuda: bool) -> tuple[Any, float]:
    best = float("inf")
    res = None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = f()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return res, best


def validate_predictor(
    predictor: Any,
    path: str | Path,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    repeats: int = 1,
    lengths: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a predictor on collected Q/K/V and measure its sparse attention against dense.

    For every (sample, layer): the layout the predictor picks (``causal=True``, ``layer=<layer>``,
    ``reset()`` before each sample), block density actually used vs the config's target (if it
    states one), blocks selected / available (causal region, all heads), output cosine / MSE /
    max abs error of sparse vs dense attention (same backend), and wall times (best of
    ``repeats``) of prediction, dense attention and sparse attention.

    Returns:
        ``{"predictor", "records": [...], "summary": {...}, "environment"}`` (JSON-friendly).
    """
    from tqdm.auto import tqdm

    from sparseattn.eval.end_to_end import _mean_std
    from sparseattn.eval.env import environment
    from sparseattn.eval.metrics import cosine_similarity, max_abs_error
    from sparseattn.predictors.resolve import describe_predictor, resolve_predictor
    from sparseattn.layout.block_layout import causal_block_region
    from sparseattn.ops.attention import attention, select_backend

    fn = "validate_predictor"
    check_positive_int(fn, "repeats", repeats)
    pred = resolve_predictor(predictor)
    if pred is None:
        raise fail(fn, "predictor", "is required", "a predictor or spec", None)
    target = _target(getattr(pred, "config", None))
    pv = getattr(getattr(pred, "config", None), "pv_threshold", None)
    cuda = str(device).startswith("cuda")
    records: list[dict[str, Any]] = []
    found = describe_collection(resolve_collection(path, fn), path)
    items = list(iter_collected(path, device="cpu", lengths=lengths, layers=layers))
    if not items:
        raise fail(fn, "lengths/layers", f"select nothing in {path}", "lengths and layers present in the collection",
                   f"lengths={list(lengths) if lengths is not None else None}, layers={list(layers) if layers is not None else None}")
    last_file = None
    for it in tqdm(items, desc="validate", unit="layer", disable=not progress):
        if it["file"] != last_file:
            pred.reset()
            last_file = it["file"]
        q, k, v = (it[r].to(device) for r in ("q", "k", "v"))
        scale = it["scale"]
        layout, t_pred = _timed(lambda: pred.predict(q, k, causal=True, layer=it["layer"]), repeats, cuda)
        dense, t_dense = _timed(lambda: attention(q, k, v, causal=True, scale=scale, backend=backend).out, repeats, cuda)
        sparse, t_sparse = _timed(lambda: attention(q, k, v, causal=True, layout=layout, scale=scale, backend=backend,
                                                    pv_threshold=pv).out, repeats, cuda)
        region, _ = causal_block_region(layout.seqlen_q, layout.seqlen_kv, layout.block_m, layout.block_n, layout.device)
        sel = int((layout.to_dense_mask() & region).sum())
        total = int(region.sum()) * layout.batch * layout.heads
        diff = (sparse.double() - dense.double())
        density = layout.density(causal=True)
        rec = {"file": Path(it["file"]).name, "seq_len": it["seq_len"], "sample": it["sample"], "layer": it["layer"],
               "heads": int(q.shape[1]), "kv_heads": int(k.shape[1]), "head_dim": int(q.shape[3]),
               "cosine": cosine_similarity(sparse, dense), "mse": float((diff ** 2).mean()),
               "max_abs_error": max_abs_error(sparse, dense), "density": density, "sparsity": 1.0 - density,
               "target_sparsity": target["target_sparsity"] if target else None,
               "blocks_selected": sel, "blocks_total": total, "block_m": layout.block_m, "block_n": layout.block_n,
               "predict_s": t_pred, "dense_s": t_dense, "sparse_s": t_sparse,
               "backend": select_backend(q, k, v, layout=layout, causal=True, pv_threshold=pv, backend=backend)}
        records.append(rec)
    by_len: dict[str, Any] = {}
    for n in sorted({r["seq_len"] for r in records}):
        rs = [r for r in records if r["seq_len"] == n]
        by_len[str(n)] = {k: _mean_std([r[k] for r in rs]) for k in
                          ("cosine", "mse", "max_abs_error", "sparsity", "predict_s", "dense_s", "sparse_s")}
        by_len[str(n)]["blocks_selected"] = sum(r["blocks_selected"] for r in rs)
        by_len[str(n)]["blocks_total"] = sum(r["blocks_total"] for r in rs)
    return {"predictor": describe_predictor(pred), "target": target, "path": str(path), "found": found, "backend": backend,
            "repeats": repeats, "records": records, "summary": by_len, "environment": environment(device)}


def validation_markdown(res: dict[str, Any]) -> str:
    """Markdown report of :func:`validate_predictor`."""
    t = res["target"]
    lines = ["# sparseattn validate", "", f"- predictor: `{json.dumps(res['predictor'])}`",
             f"- target sparsity: {t['target_sparsity']:.4f} ({t['from']})" if t else "- target sparsity: not stated by the config",
             f"- data: {res['path']} ({res.get('found', 'found ?')}); backend {res['backend']}; timings best of {res['repeats']}", "",
             "| length | cosine | MSE | max abs err | sparsity | blocks selected / total | predict s | dense s | sparse s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, s in res["summary"].items():
        lines.append(f"| {n} | {s['cosine']['mean']:.6f} | {s['mse']['mean']:.3e} | {s['max_abs_error']['mean']:.3e} | "
                     f"{s['sparsity']['mean']:.4f} | {s['blocks_selected']} / {s['blocks_total']} | "
                     f"{s['predict_s']['mean']:.4f} | {s['dense_s']['mean']:.4f} | {s['sparse_s']['mean']:.4f} |")
    lines += ["", "| file | length | layer | cosine | MSE | max abs | sparsity | target | blocks | backend |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        tgt = "-" if r["target_sparsity"] is None else f"{r['target_sparsity']:.3f}"
        lines.append(f"| {r['file']} | {r['seq_len']} | {r['layer']} | {r['cosine']:.6f} | {r['mse']:.3e} | "
                     f"{r['max_abs_error']:.3e} | {r['sparsity']:.4f} | {tgt} | {r['blocks_selected']}/{r['blocks_total']} | "
                     f"{r['backend']} |")
    lines.append("")
    lines.append("On CPU both timings come from the PyTorch reference backend and say nothing about kernel speed.")
    return "\n".join(lines) + "\n"
