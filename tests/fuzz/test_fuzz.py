"""A short coverage-guided run of every fuzz target (tests/fuzz/targets.py), as part of `make test`:
the seeds plus a bounded number of mutations, under an RSS limit and a per-input timeout. Any
untyped exception, out-of-memory or timeout fails the test with libFuzzer's report. `make fuzz`
runs the same targets for longer (FUZZ_SECONDS each)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
RUNS = 2000  # mutations after the seeds: seconds per target on this machine
RSS_MB = 512


@pytest.mark.fuzz
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_briefly(target: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-runs={RUNS}", f"-rss_limit_mb={RSS_MB}", "-timeout=10",
         "-max_total_time=120", f"-corpus_dir={tmp_path / 'corpus'}", f"-artifact_prefix={tmp_path}/", "-seed=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    report = r.stderr[-6000:]
    assert r.returncode == 0, f"fuzz target {target} failed:\n{report}"
    done = re.search(r"Done (\d+) runs", r.stderr)
    assert done and int(done.group(1)) >= RUNS, report
