"""``import sparseattn`` stays light: no transformers, matplotlib or triton, no CUDA initialisation."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "matplotlib", "triton", "sparseattn.ops.triton", "sparseattn.ops.triton_launch")

CODE = """
import json, sys
import torch
import sparseattn
import sparseattn.layout, sparseattn.state, sparseattn.eval, sparseattn.testing.inputs, sparseattn.cli.main
heavy = {heavy!r}
print(json.dumps({{
    "loaded": [m for m in heavy if m in sys.modules],
    "cuda_initialized": bool(torch.cuda.is_initialized()),
}}))
"""


def _run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_is_lean():
    got = _run(CODE.format(heavy=HEAVY))
    assert got["loaded"] == [], f"import sparseattn pulled in {got['loaded']}"
    assert got["cuda_initialized"] is False


def test_cli_parser_build_is_lean():
    # building the argparse tree imports every subcommand module: they must keep heavy imports inside run()
    code = CODE.replace("print(json.dumps", "sparseattn.cli.main.build_parser()\nprint(json.dumps")
    got = _run(code.format(heavy=("transformers", "matplotlib")))
    assert got["loaded"] == [], f"building the CLI parser pulled in {got['loaded']}"
    assert got["cuda_initialized"] is False
