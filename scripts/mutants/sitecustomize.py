"""Applies the mutant named by $CIT_MUTANT in every Python process of a mutation run (pytest and the cit-server
processes it starts alike): scripts/mutation_check.py puts this directory first on PYTHONPATH. Each process notes
in $CIT_MUTANT_STATUS whether the mutant applied (Python goes on after a failing sitecustomize)."""
import os

if os.environ.get("CIT_MUTANT"):
    import cit_mutants

    cit_mutants.apply_from_environment()
