"""A bounded run of the codec's atheris harness (tests/fuzz/fuzz_codec.py).

The harness needs the ``fuzz`` extra (``pip install -e '.[test,fuzz]'``,
which CI installs); without atheris this test skips and says so. It runs
the harness as a subprocess, as a person would, with a fixed seed and a
fixed number of runs, starting from a corpus seeded with valid frames. Any
exception the harness lets through makes libFuzzer exit non-zero and write
the input that caused it, which the failure message shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "atheris", reason="atheris is not installed: pip install -e '.[fuzz]' to run the codec fuzzer"
)

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "fuzz" / "fuzz_codec.py"
RUNS = 30_000
SEED = 1
#: A bound on the subprocess, far above what the runs take (a few seconds).
TIMEOUT = 300


def test_atheris_codec_harness_bounded_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            str(corpus),
            f"-runs={RUNS}",
            f"-seed={SEED}",
            f"-artifact_prefix={artifacts}/",
            "-max_len=4096",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not crashes, (
        f"the codec fuzzer failed (exit {proc.returncode}, inputs {crashes}):\n{proc.stderr[-4000:]}"
    )
    assert f"Done {RUNS} runs" in proc.stderr, proc.stderr[-2000:]
    # It started from the seeds (one frame of every type for every target).
    assert len(list(corpus.iterdir())) > 100
