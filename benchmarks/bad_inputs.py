"""Try every bad-input class (public API, loaders, CLI) and write ``docs/BAD_INPUTS.md``.

Usage: ``python benchmarks/bad_inputs.py [--out docs/BAD_INPUTS.md] [--json records.json]``

The cases, the runner and the checks live in :mod:`sparseattn.testing.bad_inputs` so that
``tests/test_bad_inputs.py`` runs exactly the same table. Offline and CPU only; exit status 1 if
any case is not refused the way the project promises.
"""

from __future__ import annotations

import sys

from sparseattn.testing.bad_inputs import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
