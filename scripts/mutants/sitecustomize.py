"""Applies the mutant named by $CIT_MUTANT in every Python process of a mutation run (pytest and the cit-server
processes it starts alike): scripts/mutation_check.py puts this directory first on PYTHONPATH. Each process notes
in $CIT_MUTANT_STATUS whether the mutant applied (Python goes on after a failing sitecustomize)."""
import os

if os.environ.get("CIT_MUTANT"):
    try:
        import cit_mutants

        cit_mutants.apply(os.environ["CIT_MUTANT"])
        status = "applied"
    except Exception as exc:  # noqa: BLE001 - reported by the mutation check as a broken mutant
        status = f"broken: {type(exc).__name__}: {exc}"
    with open(os.environ["CIT_MUTANT_STATUS"], "a") as f:
        f.write(status.replace("\n", " ") + "\n")
