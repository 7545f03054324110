"""``sparseattn bench``: argument parsing, the no-GPU exit, and the pattern density search (CPU only)."""

from __future__ import annotations

import pytest
import torch

from sparseattn.cli.main import build_parser, main


def test_bench_parses_arguments():
    args = build_parser().parse_args(["bench", "--pattern", "strided", "--densities", "0.5,0.1", "--seq-lens", "1024,2048",
                                      "--heads", "9", "--kv-heads", "3", "--head-dim", "64", "--no-causal", "--stress"])
    assert args.densities == [0.5, 0.1] and args.seq_lens == [1024, 2048]
    assert (args.heads, args.kv_heads, args.head_dim, args.causal, args.stress) == (9, 3, 64, False, 20)


@pytest.mark.parametrize("bad", [["--densities", "0"], ["--densities", "x"], ["--seq-lens", "-5"]])
def test_bench_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", *bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_bench_without_gpu_says_so(capsys):
    assert main(["bench", "--seq-lens", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["local", "strided", "block_diagonal", "sink_window"])
def test_pattern_near_density_is_closest(pattern):
    from sparseattn.cli.bench import _KNOBS, _pattern_near_density
    from sparseattn.layout.patterns import PATTERNS

    n, bs, target = 2048, 128, 0.3
    got = _pattern_near_density(pattern, n, target, True, bs).density(True)
    knob = _KNOBS[pattern][0]
    every = [PATTERNS[pattern](n, n, causal=True, block_m=bs, block_n=bs, **{knob: v}).density(True) for v in range(1, 17)]
    assert abs(got - target) <= min(abs(d - target) for d in every) + 1e-12
