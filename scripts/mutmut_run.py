"""mutmut over the modules that keep the registry and the request path honest, with the tests that guard them.

    python scripts/mutmut_run.py registry      # registry/cit_registry/store.py and router.py (minutes)
    python scripts/mutmut_run.py engine        # server/cit_server/engine.py and front.py (hours: real backbone)

mutmut (3.x) mutates files under ./, src/ or source/ of the directory it runs in and imports them by the path
below that; cit's packages live one folder deeper (registry/cit_registry). So the modules and the tests are
staged into a work directory as src/<package>/..., mutmut runs there, and every survivor is printed with its
diff: each must be killed by a test or explained in docs/mutation/ (the other cit packages import from the
installed project as usual, and so do the scripts and console scripts the tests start: their tests kill no
mutmut mutant).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "registry": (["registry/cit_registry"], ["store.py", "router.py"],
                 ["tests/test_registry.py", "tests/test_registry_hardening.py", "tests/test_registry_format.py",
                  "tests/test_registry_contents.py"]),
    "engine": (["registry/cit_registry", "server/cit_server"], ["engine.py", "front.py"],
               ["tests/test_engine.py", "tests/test_isolation.py", "tests/test_worker_lifecycle.py"]),
}


def stage(work: Path, target: str) -> None:
    packages, files, tests = TARGETS[target]
    shutil.rmtree(work, ignore_errors=True)
    (work / "tests").mkdir(parents=True)
    sources, mutate = [], []
    for package in packages:
        name = Path(package).name
        shutil.copytree(ROOT / package, work / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        sources.append(f"src/{name}")
        mutate += [f"src/{name}/{f}" for f in files if (ROOT / package / f).exists()]
    for f in ["tests/__init__.py", "tests/conftest.py", "tests/fake_lm_worker.py", *tests,
              "tests/test_registry.py", "tests/test_isolation.py", "tests/test_engine.py"]:
        shutil.copy2(ROOT / f, work / f)
    shutil.copytree(ROOT / "tests" / "data", work / "tests" / "data")
    shutil.copytree(ROOT / "scripts", work / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        "timeout_multiplier = 3.0\n"  # a mutant that makes a test 3x slower (e.g. an IVF index of absurd size) is caught
        f"source_paths = {sources!r}\n"
        f"only_mutate = {mutate!r}\n"
        'also_copy = ["scripts"]\n'
        f"pytest_add_cli_args_test_selection = {tests!r}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        "[tool.pytest.ini_options]\naddopts = \"-ra\"\n"
        'filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cit-mutmut"))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="go on with a run in --work that was stopped")
    args = parser.parse_args()
    work = args.work / args.target
    if not args.resume:
        stage(work, args.target)
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)], cwd=work)
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    print(results)
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.strip().endswith("survived")]
    for name in survivors:
        print(subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                             text=True).stdout)
    counts: dict[str, int] = {}
    for line in results.splitlines():
        if ":" in line:
            status = line.rsplit(":", 1)[1].strip()
            counts[status] = counts.get(status, 0) + 1
    print("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
