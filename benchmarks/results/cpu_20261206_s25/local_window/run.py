"""Experiment (not shipped): sparse decode with a wider forced local window (keep_last pages) at a fixed budget."""
import sys
import sparseattn.ops.pages as pages
from sparseattn.cli.main import main

LOCAL = int(sys.argv[1])
real = pages.sparse_decode_attention


def wrapped(*a, keep_last=1, **kw):
    return real(*a, keep_last=max(keep_last, LOCAL), **kw)


pages.sparse_decode_attention = wrapped
sys.exit(main(["gen-check", "--model", "/tmp/smol.gguf", "--text-dir", "/work/shared/data/essays", "--lengths", "4096,8128",
               "--samples", "2", "--new-tokens", "64", "--modes", "sparse_decode", "--top-pages", sys.argv[2],
               "--device", "cpu", "--dtype", "float32", "--decode-backend", "reference", "--quiet",
               "--out", f"/tmp/s25/local/gc_l{LOCAL}_p{sys.argv[2]}"]))
