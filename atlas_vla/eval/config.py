"""EvalConfig: which closed-loop LIBERO episodes to run and how the policy's chunks run (a light module:
reading it imports neither torch nor the simulator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from atlas_vla.chunk_schedule import check_ensemble_decay
from atlas_vla.eval.suites import perturbed_suites

LAYOUTS = ("official", "random")


@dataclass
class EvalConfig:
    """Closed-loop LIBERO evaluation (the [sim] extra): which episodes, and how the policy's chunks run.

    `atlas-vla eval-libero --config RUN.yaml` evaluates with this section (its flags override it).
    During training (`every_steps`, off by default) it runs on the main process while the other
    ranks wait at a barrier (the process-group timeout is raised to 2 h for that); for long
    evaluations run `atlas-vla eval-watch OUTPUT_DIR` beside training instead (it evaluates every
    checkpoint as it appears, and training never waits).
    """

    every_steps: int | None = None  # during training: evaluate every N optimizer updates; null = never
    suite: str = "libero_spatial"  # any suite the installed simulator can run (LIBERO-PRO variants included)
    perturbations: list[str] = field(default_factory=list)  # also run suite_<p> for p in swap, object, lan, task
    tasks: list[int] | None = None  # null = every task of the suite
    initial_states: list[int] = field(default_factory=lambda: list(range(5)))  # official initial states per task
    max_episode_steps: int | None = None  # policy steps per episode; null = the suite's protocol value
    replan_steps: int | None = None  # actions executed per query (openpi's name, a count); null = the whole chunk
    ensemble_decay: float | None = None  # query every step, average overlapping chunks (ACT weights exp(-decay*i), e.g. 0.1)
    camera_size: int = 256
    num_workers: int = 2  # simulator worker processes
    videos: bool = True  # write an mp4 per episode and log them to W&B
    seed: int = 0  # env.seed of every episode
    # official: LIBERO's initial states as they are; random: each episode's objects then laid out anew by
    # generate-demos' sampler, from a stream of its own (layout_seed), the goal's object named where it now is
    layouts: str = "official"
    layout_seed: int = 0

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"libero_steps": "every_steps", "max_steps": "max_episode_steps",
                                              "temporal_ensemble": "ensemble_decay"}

    def __post_init__(self) -> None:
        for name in ("every_steps", "max_episode_steps", "replan_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"eval.{name} must be >= 1 or null, got {value}")
        check_ensemble_decay(self.ensemble_decay, "eval.ensemble_decay")
        if not self.suite.startswith("libero_"):
            raise ValueError(f"eval.suite must name a LIBERO suite (libero_spatial, libero_spatial_swap, ...), "
                             f"got {self.suite!r}")
        perturbed_suites(self.suite, self.perturbations)  # a clear error for an unknown perturbation
        if self.layouts not in LAYOUTS:
            raise ValueError(f"eval.layouts must be one of {', '.join(LAYOUTS)}, got {self.layouts!r}")
        for name in ("camera_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
