"""Context-parallel attention benchmark: 1 GPU vs N GPUs (NCCL), dense and sink+window layouts.

Spawns one process per visible GPU (``torch.multiprocessing.spawn``, NCCL, ``tcp://127.0.0.1``).
Shape: Llama-3.1-8B attention (H=32, H_kv=8, D=128, bf16), ``--seqlen`` tokens (default 128K),
causal. For each layout (dense; sink+window at ``--density`` over the causal region):

* single GPU — rank 0 runs :func:`sparseattn.attention` on the whole sequence (the others wait);
* N GPUs — :func:`sparseattn.distributed.context_parallel_attention` for each ``--methods`` x
  ``--shardings`` over all ranks.

Times are medians of ``--repeats`` (>= 5) CUDA-synchronised runs after ``--warmup`` runs; a run's
time is the slowest rank's (all-reduce max), between barriers. Parity: ``--parity-rows`` sampled
global rows (plus the last row) of the N-GPU output vs the single-GPU output (max abs diff of out
and lse, bound ``ATOL_FLOOR[dtype]`` from ``sparseattn.testing.tolerances``). Bytes: what the method
sends in the whole group vs every shard to every rank (``stats`` of the call).

Prints a table, writes JSON to ``--out``. Needs >= 2 visible GPUs (exit 2 with one line otherwise);
``--cpu-smoke`` runs the same code path on 2 CPU processes with gloo and the reference backend at a
tiny size (float32), to check the script without GPUs.

Usage::

    PYTHONPATH=src python benchmarks/bench_context_parallel.py --out $OUT/bench_cp.json
    PYTHONPATH=src python benchmarks/bench_context_parallel.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_context_parallel.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072, help="global sequence length (default 131072)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block", type=int, default=128, help="layout block_m = block_n (default 128)")
    p.add_argument("--density", type=float, default=0.1, help="sink+window density over the causal region")
    p.add_argument("--layouts", default="dense,sinkwin", help="comma list of dense, sinkwin")
    p.add_argument("--methods", default="allgather,ring,p2p", help="comma list of allgather, ring, p2p")
    p.add_argument("--shardings", default="zigzag,contiguous", help="comma list of zigzag, contiguous")
    p.add_argument("--non-causal", action="store_true", help="bidirectional attention instead of causal")
    p.add_argument("--world", type=int, default=0, help="GPUs to use (default: all visible)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (>= 5; median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parity-rows", type=int, default=1024, help="sampled global rows checked against 1 GPU")
    p.add_argument("--backend", default="auto", help="attention backend (auto, triton, reference)")
    p.add_argument("--out", default=None, help="JSON output path (default $OUT/bench_context_parallel.json if $OUT)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="2 CPU processes, gloo, reference backend, tiny float32 shape: checks the code path only")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layout(name: str, a: argparse.Namespace, device: torch.device):
    from sparseattn.layout.patterns import pattern_at_density

    if name == "dense":
        return None, 1.0
    if name == "sinkwin":
        lay = pattern_at_density("sink_window", a.seqlen, density=a.density, causal=not a.non_causal,
                                 block_m=a.block, block_n=a.block, heads=a.heads, device=device)
        return lay, lay.density(causal=not a.non_causal)
    raise SystemExit(f"bench_context_parallel: unknown layout {name!r} (dense, sinkwin)")


def _timed(fn, a: argparse.Namespace, device: torch.device, group_sync: bool, active: bool = True) -> list[float]:
    """Per-run wall ms (max over ranks when ``group_sync``); ``active=False`` ranks only join the barriers."""
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(a.warmup + a.repeats):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        if active:
            fn()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        if group_sync:
            t = torch.tensor([ms], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms = float(t.item())
        if i >= a.warmup:
            times.append(ms)
    return times


def _worker(rank: int, world: int, a: argparse.Namespace, port: int, result_path: str) -> None:
    import torch.distributed as dist

    from sparseattn import attention
    from sparseattn.distributed import context_parallel_attention, shard, shard_positions
    from sparseattn.testing.tolerances import ATOL_FLOOR

    cpu = a.cpu_smoke
    if cpu:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    else:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    dist.barrier()  # first collective on all ranks (NCCL p2p ops that follow need an initialised communicator)
    rows: list[dict[str, Any]] = []
    error = None
    try:
        dtype = DTYPES[a.dtype]
        causal = not a.non_causal
        g = torch.Generator(device=device).manual_seed(1234)
        q = torch.randn(1, a.heads, a.seqlen, a.head_dim, generator=g, device=device, dtype=dtype)
        k = torch.randn(1, a.kv_heads, a.seqlen, a.head_dim, generator=g, device=device, dtype=dtype)
        v = torch.randn(1, a.kv_heads, a.seqlen, a.head_dim, generator=g, device=device, dtype=dtype)
        # every rank generated the same full inputs (same seed): check, since parity depends on it
        chk = torch.stack([t.double().sum() for t in (q, k, v)])
        allchk = [torch.empty_like(chk) for _ in range(world)]
        dist.all_gather(allchk, chk)
        if not all(torch.equal(c, allchk[0]) for c in allchk):
            raise RuntimeError(f"ranks generated different inputs: {[c.tolist() for c in allchk]}")
        gs = torch.Generator().manual_seed(7)
        sample = torch.cat([torch.randperm(a.seqlen, generator=gs)[: a.parity_rows], torch.tensor([a.seqlen - 1])])
        sample = sample.unique().to(device)
        for lname in a.layouts.split(","):
            layout, density = _layout(lname, a, device)
            # ---- 1 GPU: rank 0 on the whole sequence
            single: dict[str, Any] = {}

            def run_single() -> None:
                single["st"] = attention(q, k, v, causal=causal, layout=layout, backend=a.backend)

            t_single = _timed(run_single, a, device, group_sync=False, active=rank == 0)
            if rank == 0:
                ref_out = single["st"].out[:, :, sample].float()
                ref_lse = single["st"].lse[:, :, sample].float()
                single.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ms_single = statistics.median(t_single)
            for sharding in a.shardings.split(","):
                ql, kl, vl = (shard(t, rank, world, sharding) for t in (q, k, v))
                pos = shard_positions(a.seqlen, rank, world, sharding).to(device)
                for method in a.methods.split(","):
                    stats: dict[str, Any] = {}
                    res: dict[str, Any] = {}

                    def run_cp() -> None:
                        res["st"] = context_parallel_attention(ql, kl, vl, causal=causal, layout=layout, method=method,
                                                               sharding=sharding, backend=a.backend, stats=stats)

                    t_cp = _timed(run_cp, a, device, group_sync=True)
                    st = res.pop("st")
                    # sampled rows: each rank fills the rows it owns, the sum over ranks assembles them
                    owner = torch.full((a.seqlen,), -1, dtype=torch.long, device=device)
                    owner[pos] = torch.arange(pos.numel(), device=device)
                    loc = owner[sample]
                    mine = loc >= 0
                    got_out = torch.zeros(1, a.heads, sample.numel(), a.head_dim, dtype=torch.float32, device=device)
                    got_lse = torch.zeros(1, a.heads, sample.numel(), dtype=torch.float32, device=device)
                    got_out[:, :, mine] = st.out[:, :, loc[mine]].float()
                    got_lse[:, :, mine] = st.lse[:, :, loc[mine]].float()
                    dist.all_reduce(got_out)
                    dist.all_reduce(got_lse)
                    del st
                    ms_cp = statistics.median(t_cp)
                    if rank == 0:
                        fin = torch.isfinite(ref_lse)
                        out_err = float((got_out - ref_out).abs().max())
                        lse_err = float((got_lse[fin] - ref_lse[fin]).abs().max()) if bool(fin.any()) else 0.0
                        bound = ATOL_FLOOR[dtype]
                        rows.append({
                            "layout": lname, "density": round(density, 4), "sharding": sharding, "method": method,
                            "world": world, "ms_1gpu": ms_single, "ms_cp": ms_cp, "speedup": ms_single / ms_cp,
                            "ms_1gpu_runs": t_single, "ms_cp_runs": t_cp,
                            "parity_rows": int(sample.numel()), "out_max_abs_diff": out_err,
                            "lse_max_abs_diff": lse_err, "parity_bound": bound,
                            "parity_ok": out_err <= bound and lse_err <= bound,
                            "bytes_sent": stats["bytes_sent_total"], "bytes_needed": stats["bytes_needed"],
                            "bytes_dense": stats["bytes_dense"], "pairs_skipped": stats["pairs_skipped"],
                        })
                        print(_fmt_row(rows[-1]), flush=True)
                del ql, kl, vl
    except BaseException:
        error = traceback.format_exc()
        print(f"rank {rank}: {error}", file=sys.stderr, flush=True)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"rows": rows, "error": error}, f)
    dist.destroy_process_group()


HEADER = (f"{'layout':8} {'dens':>5} {'sharding':10} {'method':9} {'N':>2} {'1 GPU ms':>9} {'N GPU ms':>9} "
          f"{'speedup':>7} {'out diff':>9} {'lse diff':>9} {'ok':>3} {'MB sent':>9} {'MB dense':>9}")


def _fmt_row(r: dict[str, Any]) -> str:
    return (f"{r['layout']:8} {r['density']:5.3f} {r['sharding']:10} {r['method']:9} {r['world']:2d} "
            f"{r['ms_1gpu']:9.2f} {r['ms_cp']:9.2f} {r['speedup']:6.2f}x {r['out_max_abs_diff']:9.2e} "
            f"{r['lse_max_abs_diff']:9.2e} {'yes' if r['parity_ok'] else 'NO':>3} {r['bytes_sent'] / 2**20:9.3f} "
            f"{r['bytes_dense'] / 2**20:9.3f}")


def env_info(cpu: bool) -> dict[str, Any]:
    from sparseattn.eval.env import environment

    info = environment("cpu" if cpu else "cuda")
    if not cpu:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return info


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.repeats < 5:
        print(f"bench_context_parallel: --repeats must be >= 5; got {a.repeats}", file=sys.stderr)
        return 2
    if a.cpu_smoke:
        a.seqlen, a.heads, a.kv_heads, a.head_dim, a.block = 512, 4, 2, 16, 32
        a.dtype, a.backend, a.parity_rows, a.warmup, a.density = "fp32", "reference", 64, 1, 0.3
        world = 2
    else:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpu < 2:
            print(f"bench_context_parallel: needs >= 2 visible CUDA GPUs, found {n_gpu} "
                  "(use --cpu-smoke to check the code path on CPU)", file=sys.stderr)
            return 2
        world = a.world or n_gpu
        if not 2 <= world <= n_gpu:
            print(f"bench_context_parallel: --world must be in [2, {n_gpu}]; got {world}", file=sys.stderr)
            return 2
    out_path = a.out or (os.path.join(os.environ["OUT"], "bench_context_parallel.json") if os.environ.get("OUT") else None)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.json")
        print(HEADER, flush=True)
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, a, _free_port(), result_path), nprocs=world, join=True)
        with open(result_path) as f:
            result = json.load(f)
    doc = {"config": vars(a), "world": world, "env": env_info(a.cpu_smoke), "wall_s": time.perf_counter() - t0,
           **result}
    print("\n" + HEADER)
    for r in result["rows"]:
        print(_fmt_row(r))
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {out_path}")
    if result["error"]:
        print(f"bench_context_parallel: failed: {result['error'].strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    if not all(r["parity_ok"] for r in result["rows"]):
        print("bench_context_parallel: parity FAILED for some rows (see table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
