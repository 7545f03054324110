"""Try every bad-input class (public API, loaders, CLI) and write ``docs/BAD_INPUTS.md``.

Usage: ``python benchmarks/bad_inputs.py [--out docs/BAD_INPUTS.md] [--json records.json]``

The cases, the runner and the checks live in :mod:`sparseattn.testing.bad_inputs` so that
``tests/test_bad_inputs.py`` runs exactly the same table. Offline and CPU only; exit status 1 if
any case is not refused the way the project promises.
"""

from __future__ import annotations

import os
import sys

import torch

# as tests/conftest.py: without CUDA the Triton kernel runs under the interpreter, so the kernel's own
# refusals (head_dim, dtype) show instead of "q is on the CPU"; set before triton is first imported
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sparseattn.testing.bad_inputs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
