"""The validation loader of a run: N batches per process of samples spread over the whole split, shared out by
Accelerate's own loader preparation as each process of a run would get them."""

from __future__ import annotations

import pytest
from accelerate.data_loader import prepare_data_loader

from atlas_vla.config import TrainingConfig
from atlas_vla.eval.offline import scored_samples
from atlas_vla.training.loaders import build_val_loader


@pytest.mark.parametrize("processes", [1, 2])
def test_each_process_scores_its_batches_of_samples_spread_over_the_split(processes):
    split = list(range(103))  # an episode-ordered split of 103 samples
    config = TrainingConfig(train_batch_size=4, num_validation_batches=3, dataloader_num_workers=0)
    scored = []
    for rank in range(processes):
        loader = prepare_data_loader(build_val_loader(split, config, processes), num_processes=processes,
                                     process_index=rank, put_on_device=False)
        batches = [batch for batch in loader]
        assert len(batches) == 3 and all(len(batch) == 4 for batch in batches)  # N full batches on every process
        scored += [sample for batch in batches for sample in batch]
    spread = scored_samples(split, 3 * 4 * processes)
    assert sorted(scored) == [spread[i] for i in range(len(spread))]  # each spread sample once, none twice
    assert scored[0] == 0 and max(scored) == 102  # from the first episode to the last


def test_an_unlimited_validation_scores_the_whole_split_in_order():
    config = TrainingConfig(train_batch_size=4, num_validation_batches=None, dataloader_num_workers=0)
    assert [sample for batch in build_val_loader(list(range(10)), config, 1) for sample in batch] == list(range(10))
