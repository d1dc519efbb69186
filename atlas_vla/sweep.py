"""W&B sweeps in-process: `wandb.agent(sweep_id, function=train_function)`.

The sweep's parameters are our own flag or config-key names (`learning_rate`, `train_batch_size`,
`model.fusion.hidden_dim`, ...), exactly as `configs/sweep.yaml` passes them to `train.py` through
`${args}` for the command-line agent; here they are read from `wandb.config` of the agent's run and
applied as overrides on top of a base config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from atlas_vla.config import FLAG_ALIASES, load_config, merge, set_dotted
from atlas_vla.training.tracking import sweep_trial_dir
from atlas_vla.training.train import train

# the demo config of the checkout this package runs from, wherever the sweep is started
DEFAULT_BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def sweep_overrides(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Sweep parameters (flag or dotted names) -> a nested override dict; unknown names fail clearly."""
    overrides: dict[str, Any] = {}
    for name, value in parameters.items():
        if name.startswith("_") or name == "config":
            continue
        set_dotted(overrides, FLAG_ALIASES.get(name, name), value)
    return overrides


def train_function(base_config: str | os.PathLike | None = None) -> Path:
    """Train one sweep trial: the active W&B run's config overrides the base config.

    `wandb.agent` starts the run; called outside an agent, it starts one itself (`wandb.init()`).
    The base config is `base_config`, else `config` from the sweep parameters, else this checkout's
    `configs/demo.yaml`; relative paths mean the working directory, as for `train.py`.
    The trial writes into `<output_dir>/sweep-<run id>` (`sweep_trial_dir`, as `train.py` under
    `wandb agent` does), so trials never share checkpoints.
    """
    import wandb

    run = wandb.run or wandb.init()
    parameters = dict(run.config)
    path = base_config or parameters.get("config") or DEFAULT_BASE_CONFIG
    config = load_config(path, merge(sweep_overrides(parameters), {"training": {"report_to": "wandb"}}))
    config.training.output_dir = str(sweep_trial_dir(config.training.output_dir, run.id))
    config.wandb.project = run.project or config.wandb.project
    return train(config, wandb_run_id=run.id)
