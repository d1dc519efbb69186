"""The run's frozen-feature store (`training.feature_store`): where it lives, and found, checked or built.

The store itself (format, key, building) is `data/feature_store.py`; this module decides which store a
run uses and builds it with every process of the run, under a file lock that makes a second run
wanting the same store wait and then reuse it.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from atlas_vla.config import TrainingConfig
from atlas_vla.data.feature_store import FeatureStore, StoreKey, build_store, is_complete
from atlas_vla.models.policy import AtlasPolicy

logger = logging.getLogger("atlas_vla.train")


def feature_store_path(training_cfg: TrainingConfig, key: StoreKey) -> Path:
    """Where `training.feature_store` puts the store for `key`: the folder given, or with `auto`
    `<output_dir>/../feature_stores/<key digest>`, which runs, seeds and sweep trials of one parent share."""
    if training_cfg.feature_store == "auto":
        return Path(training_cfg.output_dir).resolve().parent / "feature_stores" / key.digest()
    return Path(training_cfg.feature_store)


def prepare_feature_store(accelerator: Accelerator, policy: AtlasPolicy, train_samples: Any,
                          training_cfg: TrainingConfig, path: Path | None = None) -> FeatureStore:
    """The feature store of these training samples (at `path`, else `feature_store_path`): reused when its key
    matches, refused with the differing fields when not, built by every process of the run when absent.

    A file lock on `<store>.lock` makes a second run that wants the same store wait for the build, then reuse it."""
    key = StoreKey.for_policy(policy, train_samples, copies=training_cfg.cached_copies,
                              device_type=accelerator.device.type)
    path = path or feature_store_path(training_cfg, key)
    lock = None
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    try:
        needs_build = [not is_complete(path)]
        if accelerator.num_processes > 1:
            broadcast_object_list(needs_build)
        if needs_build[0]:
            policy.to(accelerator.device)
            logger.info("building the feature store %s (%d samples x %d copies)", path, len(train_samples),
                        key.copies)
            store = build_store(path, train_samples, policy.vision_features, key, policy.vision_feature_shape(),
                                process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                                wait_for_everyone=accelerator.wait_for_everyone,
                                progress=accelerator.is_local_main_process)
        else:
            store = FeatureStore(path)
    finally:
        if lock is not None:
            lock.close()
    store.check_key(key)
    logger.info("training on the feature store %s: %d samples x %d copies (%.2f GB)", path, store.num_samples,
                store.copies, store.nbytes / 1e9)
    return store
