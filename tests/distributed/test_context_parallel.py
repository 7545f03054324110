"""Context-parallel attention on gloo (CPU): exact vs single-process reference, methods bitwise equal.

One spawned process group per world size (spawn is slow on 2 cores): each rank runs every
configuration — causal or not, zigzag or contiguous sharding, dense / sink+window / random layout
with empty rows, GQA — with every method (allgather, ring, p2p), gathers the outputs, unshards them
and compares with ``reference_attention`` over the whole sequence (float64, ``CP_FP64_ATOL``).
Results go to one file per rank; the assertions run in the pytest process.
"""

from __future__ import annotations

import datetime
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparseattn.distributed import (
    METHODS,
    context_parallel_attention,
    contiguous_shard,
    contiguous_unshard,
    plan_communication,
    rank_chunks,
    shard,
    shard_positions,
    unshard,
    zigzag_shard,
    zigzag_unshard,
)
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import dense_layout, random_layout, sink_window_layout
from sparseattn.ops.reference import reference_attention
from sparseattn.testing.inputs import random_qkv
from sparseattn.testing.tolerances import CP_FP64_ATOL

B, H, HKV, D, BLOCK = 1, 4, 2, 16, 32
SEQLEN = {2: 256, 3: 384, 4: 256}


def _layouts(n: int, causal: bool) -> dict[str, BlockLayout | None]:
    sw = sink_window_layout(n, sink_blocks=1, window_blocks=2, block_m=BLOCK, block_n=BLOCK, heads=H, causal=causal)
    rnd = random_layout(n, density=0.3, seed=3, block_m=BLOCK, block_n=BLOCK, heads=H, causal=causal)
    mask = rnd.to_dense_mask().clone()
    mask[:, 0, 1:3] = False  # head 0: two query blocks attend nothing (out 0, lse -inf)
    holes = BlockLayout.from_dense_mask(mask, block_m=BLOCK, block_n=BLOCK, seqlen_q=n, seqlen_kv=n)
    return {"dense": None, "sinkwin": sw, "random_holes": holes}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; infinities must sit at the same places with the same sign."""
    if not torch.equal(torch.isinf(a), torch.isinf(b)) or not torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]):
        return math.inf
    fin = torch.isfinite(a)
    return float((a[fin] - b[fin]).abs().max()) if bool(fin.any()) else 0.0


def _cases(rank: int, world: int) -> dict:
    import torch.distributed as dist

    n = SEQLEN[world]
    q, k, v = random_qkv(B, H, n, D, kv_heads=HKV, dtype=torch.float64, seed=11 + world)
    res: dict = {"cases": {}, "bad": {}}
    for causal in (True, False):
        for lname, layout in _layouts(n, causal).items():
            ref = reference_attention(q, k, v, causal=causal, layout=layout)
            for sharding in ("zigzag", "contiguous"):
                ql, kl, vl = (shard(t, rank, world, sharding) for t in (q, k, v))
                by_method = {}
                for method in METHODS:
                    stats: dict = {}
                    st = context_parallel_attention(ql, kl, vl, causal=causal, layout=layout, method=method,
                                                    sharding=sharding, backend="reference", stats=stats)
                    outs = [torch.empty_like(st.out) for _ in range(world)]
                    lses = [torch.empty_like(st.lse) for _ in range(world)]
                    dist.all_gather(outs, st.out.contiguous())
                    dist.all_gather(lses, st.lse.contiguous())
                    full_out = unshard(outs, world, sharding)
                    full_lse = unshard(lses, world, sharding)
                    pos = shard_positions(n, rank, world, sharding)
                    by_method[method] = st
                    res["cases"][(causal, lname, sharding, method)] = {
                        "out_err": _err(full_out, ref.out), "lse_err": _err(full_lse, ref.lse),
                        "local_out_err": _err(st.out, ref.out[:, :, pos]), "stats": stats,
                        "shape_ok": tuple(st.out.shape) == tuple(ql.shape) and st.out.dtype == torch.float64
                        and st.lse.dtype == torch.float64,
                    }
                base = by_method["allgather"]
                res["cases"][(causal, lname, sharding, "bitwise")] = all(
                    torch.equal(s.out, base.out) and torch.equal(s.lse, base.lse) for s in by_method.values())

    # bad inputs: every rank raises the project's error (no hang)
    ql, kl, vl = (zigzag_shard(t, rank, world) for t in (q, k, v))

    def bad(name: str, **kw) -> None:
        args = {"q_local": ql, "k_local": kl, "v_local": vl, **kw}
        try:
            context_parallel_attention(args.pop("q_local"), args.pop("k_local"), args.pop("v_local"),
                                       backend="reference", **args)
            res["bad"][name] = "no error"
        except ValueError as exc:
            res["bad"][name] = str(exc)

    bad("misaligned_layout", layout=dense_layout(n, block_m=128, block_n=128, heads=H))
    bad("world_mismatch", layout=dense_layout(n // 2, block_m=BLOCK, block_n=BLOCK, heads=H))
    bad("odd_local_length", q_local=ql[:, :, :-1], k_local=kl[:, :, :-1], v_local=vl[:, :, :-1])
    short = ql.shape[2] // 2 if rank == 1 else ql.shape[2]
    bad("ranks_disagree", q_local=ql[:, :, :short], k_local=kl[:, :, :short], v_local=vl[:, :, :short])
    bad("method", method="broadcast")
    bad("k_length", k_local=kl[:, :, :-2], v_local=vl[:, :, :-2])
    # the group still works after the errors
    st = context_parallel_attention(ql, kl, vl, backend="reference")
    res["after_errors_err"] = _err(st.out, reference_attention(q, k, v, causal=True).out[:, :, shard_positions(n, rank, world)])
    return res


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = _cases(rank, world)
    except BaseException:  # reported by the pytest process
        res = {"error": traceback.format_exc()}
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, str(tmp)), nprocs=world, join=True)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return world, results


def test_exact_vs_single_process(world_results):
    world, results = world_results
    for r, res in enumerate(results):
        for key, c in res["cases"].items():
            if key[-1] == "bitwise":
                continue
            assert c["shape_ok"], (r, key)
            for what in ("out_err", "lse_err", "local_out_err"):
                assert c[what] <= CP_FP64_ATOL, f"world {world} rank {r} {key}: {what}={c[what]:.3e}"
    assert len(results[0]["cases"]) == 2 * 3 * 2 * (len(METHODS) + 1)


def test_methods_bitwise_identical(world_results):
    _, results = world_results
    for r, res in enumerate(results):
        for key, c in res["cases"].items():
            if key[-1] == "bitwise":
                assert c is True, (r, key)


def test_p2p_skips_unneeded_shards(world_results):
    world, results = world_results
    for causal, lname, sharding in [(True, "sinkwin", "contiguous"), (True, "dense", "contiguous")]:
        s = results[0]["cases"][(causal, lname, sharding, "p2p")]["stats"]
        assert s["bytes_needed"] < s["bytes_dense"], s
        assert s["pairs_skipped"] > 0 and s["bytes_sent_total"] == s["bytes_needed"]
        total_sent = sum(res["cases"][(causal, lname, sharding, "p2p")]["stats"]["bytes_sent"] for res in results)
        total_recv = sum(res["cases"][(causal, lname, sharding, "p2p")]["stats"]["bytes_received"] for res in results)
        assert total_sent == total_recv == s["bytes_needed"]
        dense = results[0]["cases"][(causal, lname, sharding, "allgather")]["stats"]
        assert dense["bytes_sent_total"] == dense["bytes_dense"] == s["bytes_dense"]
    # non-causal dense: everything is needed
    s = results[0]["cases"][(False, "dense", "zigzag", "p2p")]["stats"]
    assert s["bytes_needed"] == s["bytes_dense"] and s["pairs_skipped"] == 0


def test_bad_inputs_raise_on_every_rank(world_results):
    _, results = world_results
    expect = {"misaligned_layout": "do not align", "world_mismatch": "global sequence",
              "odd_local_length": "chunks per rank", "ranks_disagree": "differ across ranks",
              "method": "method is unknown", "k_length": "same positions"}
    for r, res in enumerate(results):
        for name, frag in expect.items():
            msg = res["bad"][name]
            assert msg.startswith("context_parallel_attention: ") and "; expected " in msg and frag in msg, (r, name, msg)
        assert res["after_errors_err"] <= CP_FP64_ATOL


# ---------------------------------------------------------------------------------------- no processes
def test_not_initialised_raises():
    import torch.distributed as dist

    assert not dist.is_initialized()
    q = torch.zeros(1, 2, 64, 16)
    with pytest.raises(ValueError, match=r"^context_parallel_attention: group is not initialised; expected "):
        context_parallel_attention(q, q, q)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharding_round_trip_and_positions(world):
    n = 2 * world * 8
    x = torch.arange(n).view(1, 1, n, 1).expand(1, 2, n, 3).contiguous()
    for sh, (f, g) in {"zigzag": (zigzag_shard, zigzag_unshard), "contiguous": (contiguous_shard, contiguous_unshard)}.items():
        parts = [f(x, r, world) for r in range(world)]
        assert torch.equal(g(parts, world), x)
        for r in range(world):
            assert torch.equal(parts[r][0, 0, :, 0], shard_positions(n, r, world, sh))
        allpos = torch.cat([shard_positions(n, r, world, sh) for r in range(world)])
        assert torch.equal(allpos.sort().values, torch.arange(n))
    assert rank_chunks(0, world) == (0, 2 * world - 1)
    c = n // (2 * world)
    assert zigzag_shard(x, 0, world)[0, 0, c:, 0].tolist() == list(range(n - c, n))
    # other dims
    y = torch.arange(n * 2).view(n, 2)
    assert torch.equal(zigzag_unshard([zigzag_shard(y, r, world, dim=0) for r in range(world)], world, dim=0), y)


def test_sharding_bad_inputs():
    x = torch.zeros(1, 1, 30, 4)
    with pytest.raises(ValueError, match=r"^zigzag_shard: seqlen is not divisible by the 8 chunks"):
        zigzag_shard(x, 0, 4)
    with pytest.raises(ValueError, match=r"^zigzag_shard: rank is out of range; expected 0 <= rank < world=2"):
        zigzag_shard(torch.zeros(1, 1, 32, 4), 2, 2)
    with pytest.raises(ValueError, match=r"^contiguous_unshard: parts must hold one tensor per rank"):
        contiguous_unshard([x], 2)
    with pytest.raises(ValueError, match=r"^shard: sharding is unknown"):
        shard(x, 0, 1, "striped")


def test_plan_communication():
    n, w = 512, 4
    # contiguous causal dense: rank d needs every earlier rank
    p = plan_communication(None, w, "contiguous", causal=True)
    assert p.need.tolist() == [[s < d for s in range(w)] for d in range(w)]
    assert p.bytes(10) == {"bytes_needed": 60, "bytes_dense": 120, "pairs_needed": 6, "pairs_skipped": 6}
    # zigzag causal dense: every rank holds a late chunk, so everything is needed
    assert plan_communication(None, w, "zigzag").pairs_skipped == 0
    # contiguous sink + window (window inside one chunk): only rank 0 (sink) and the previous rank
    lay = sink_window_layout(n, sink_blocks=1, window_blocks=2, block_m=32, block_n=32, heads=2)
    p = plan_communication(lay, w, "contiguous")
    assert p.sources(3) == [0, 2] and p.sources(1) == [0] and p.sources(0) == []
    assert p.destinations(0) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"^plan_communication: layout block boundaries do not align"):
        plan_communication(dense_layout(n, block_m=128, block_n=128), w, "zigzag")  # chunks of 64
    with pytest.raises(ValueError, match=r"^plan_communication: sharding is unknown"):
        plan_communication(None, w, "striped")


def test_not_imported_by_package_root():
    import subprocess
    import sys

    code = "import sys, sparseattn; print(any(m.startswith('sparseattn.distributed') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
