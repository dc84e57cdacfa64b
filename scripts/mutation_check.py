"""Mutation check: every named mutant (scripts/mutants/cit_mutants.py) removes one guard, and the tests that
protect it must then fail.

    python scripts/mutation_check.py [--only NAME ...] [--quick] [--list]

Each mutant's tests run with the mutant applied in every process (pytest and the servers it starts); a mutant that
did not apply in every one of them (its target is gone) is BROKEN, never killed. Prints one line per mutant --
killed, SURVIVED or BROKEN -- and exits 1 unless every mutant is killed. The tests themselves pass unmutated in
the suite; run them with --baseline to check that here too.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "mutants"
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cit_mutants import MUTANTS  # noqa: E402


def run_tests(tests: tuple[str, ...], name: str | None, status: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    env.pop("CIT_MUTANT", None)
    if name:
        env.update(CIT_MUTANT=name, CIT_MUTANT_STATUS=str(status))
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and what each removes")
    parser.add_argument("--baseline", action="store_true", help="first run every mutant's tests unmutated")
    parser.add_argument("--quick", action="store_true", help="leave out mutants whose tests take minutes")
    args = parser.parse_args()
    chosen = [MUTANTS[n] for n in args.only] if args.only else list(MUTANTS.values())
    chosen = [m for m in chosen if not (args.quick and m.slow)]
    if args.list:
        for m in chosen:
            print(f"{m.name:<40} {m.removes}{' (slow)' if m.slow else ''}\n{'':<40} tests: {' '.join(m.tests)}")
        return 0
    if args.baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        base = run_tests(tests, None)
        if base.returncode != 0:
            print(f"baseline: the tests fail unmutated\n{base.stdout[-3000:]}")
            return 1
        print(f"baseline: {len(tests)} test selections pass unmutated")
    outcomes = {"killed": 0, "SURVIVED": 0, "BROKEN": 0}
    start = time.time()
    for m in chosen:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            status = Path(tmp) / "status"
            result = run_tests(m.tests, m.name, status)
            applied = status.read_text().splitlines() if status.exists() else ["broken: never applied"]
        broken = next((line for line in applied if line != "applied"), None)
        if broken:
            outcome, detail = "BROKEN", broken
        else:
            # 1: tests failed, as they must; 0: they passed; other codes (errors, no tests collected) prove nothing
            outcome = {1: "killed", 0: "SURVIVED"}.get(result.returncode, "BROKEN")
            detail = next((line for line in reversed(result.stdout.splitlines()) if line.strip()), "")
        outcomes[outcome] += 1
        print(f"{outcome:<9} {m.name:<40} {time.time() - t0:5.0f} s  {detail[:150]}", flush=True)
    print(f"{len(chosen)} mutants in {time.time() - start:.0f} s: " + ", ".join(f"{v} {k}" for k, v in outcomes.items()))
    return 0 if outcomes["killed"] == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
