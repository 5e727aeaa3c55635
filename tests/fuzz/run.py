"""``python -m tests.fuzz.run TARGET [libFuzzer flags...]``: coverage-guided fuzzing of one target
(tests/fuzz/targets.py) with atheris, starting from the seeds in tests/fuzz/corpus/TARGET.

The seed directory is only read: inputs that find new coverage go to ``-corpus_dir=DIR`` (default:
a scratch directory), crashes to ``-artifact_prefix`` (default: the current directory). Defaults:
-rss_limit_mb=1024, -timeout=10 (seconds per input) and the target's -max_len; flags given later
win. The exit status is 0 only when no input crashed, ran out of memory or timed out.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import tempfile
from pathlib import Path

import atheris

from tests.fuzz.targets import MODULES, TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def _import_all(prefixes: list[str]) -> None:
    """Import every module under the prefixes (inside instrument_imports, so all are covered)."""
    for name in prefixes:
        mod = importlib.import_module(name)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), prefix=name + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def _own_peak_rss() -> None:
    """Fork once and fuzz in the child. libFuzzer's -rss_limit_mb reads the peak RSS
    (ru_maxrss), which Linux carries over from whatever started this process (a pytest that
    grew to 600 MiB makes every target "run out of memory" at once); a forked child starts
    its own count. The parent only waits and passes the child's exit status on."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)


def main(argv: list[str]) -> None:
    _own_peak_rss()
    if not argv or argv[0] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[argv[0]]
    flags = argv[1:]
    scratch = next((f.split("=", 1)[1] for f in flags if f.startswith("-corpus_dir=")), None)
    flags = [f for f in flags if not f.startswith("-corpus_dir=")]
    if scratch is None:
        scratch = tempfile.mkdtemp(prefix=f"bdserver-fuzz-{target.name}-")
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=MODULES[target.name]):
        _import_all(MODULES[target.name])
    words = CORPUS.parent / f"{target.name}.dict"  # libFuzzer dictionary of the format's tokens
    args = [sys.argv[0], scratch, str(CORPUS / target.name), f"-max_len={target.max_len}", "-rss_limit_mb=1024",
            "-timeout=10", *([f"-dict={words}"] if words.exists() else []), *flags]
    atheris.Setup(args, target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
