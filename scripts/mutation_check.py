"""Mutation check: every named mutant (scripts/mutants/cit_mutants.py) removes one guard, and the tests that
protect it must then fail.

    python scripts/mutation_check.py [--only NAME ...] [--quick] [--list]

Each mutant's tests run with the mutant applied in every process (pytest, in a child forked from this process
once the heavy libraries are imported, and the servers it starts, through sitecustomize); a mutant that
did not apply in every one of them (its target is gone) is BROKEN, never killed. Prints one line per mutant --
killed, SURVIVED or BROKEN -- and exits 1 unless every mutant is killed. The tests themselves pass unmutated in
the suite; run them with --baseline to check that here too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "mutants"
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cit_mutants import MUTANTS  # noqa: E402

# Imported once here, before the runs fork: each mutant's pytest process would otherwise spend ~8 s importing them
# (46 mutants: six minutes). Nothing of cit is imported before a fork, so a child applies its mutant to a fresh
# cit exactly as sitecustomize does in a new interpreter; nothing here starts a thread or opens a channel.
PRELOAD = ("numpy", "PIL.Image", "torch", "transformers", "peft", "sentence_transformers", "faiss", "safetensors",
           "pytest", "hypothesis")


def run_tests(tests: tuple[str, ...], name: str | None, status: Path | None = None) -> tuple[int, str]:
    """pytest over `tests` in a forked child with the mutant applied (the processes it starts apply it through
    sitecustomize on PYTHONPATH, which main sets): its exit code and output."""
    with tempfile.TemporaryFile("w+") as out:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 3
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os.chdir(ROOT)
                os.environ.pop("CIT_MUTANT", None)
                if name:
                    os.environ.update(CIT_MUTANT=name, CIT_MUTANT_STATUS=str(status))
                    import cit_mutants as mutants

                    mutants.apply_from_environment()
                import pytest

                code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, wait_status = os.waitpid(pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(wait_status), out.read()


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
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    for module in PRELOAD:
        importlib.import_module(module)
    if args.baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, output = run_tests(tests, None)
        if code != 0:
            print(f"baseline: the tests fail unmutated\n{output[-3000:]}")
            return 1
        print(f"baseline: {len(tests)} test selections pass unmutated")
    outcomes = {"killed": 0, "SURVIVED": 0, "BROKEN": 0}
    start = time.time()
    for m in chosen:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            status = Path(tmp) / "status"
            code, output = run_tests(m.tests, m.name, status)
            applied = status.read_text().splitlines() if status.exists() else ["broken: never applied"]
        broken = next((line for line in applied if line != "applied"), None)
        if broken:
            outcome, detail = "BROKEN", broken
        else:
            # 1: tests failed, as they must; 0: they passed; other codes (errors, no tests collected) prove nothing
            outcome = {1: "killed", 0: "SURVIVED"}.get(code, "BROKEN")
            detail = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        outcomes[outcome] += 1
        print(f"{outcome:<9} {m.name:<40} {time.time() - t0:5.0f} s  {detail[:150]}", flush=True)
    print(f"{len(chosen)} mutants in {time.time() - start:.0f} s: " + ", ".join(f"{v} {k}" for k, v in outcomes.items()))
    return 0 if outcomes["killed"] == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
