"""The short nnU-Net trainer's wall-time budget (the rest of the training code runs in bench/train_knee_seg.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("nnunetv2")

from workbench.knee.nnunet_trainers.short_trainer import nnUNetTrainerShort  # noqa: E402


def _trainer(current_epoch, num_epochs, max_epochs, budget_s):
    messages = []
    return SimpleNamespace(current_epoch=current_epoch, num_epochs=num_epochs, max_epochs=max_epochs,
                           time_budget_s=budget_s, lr_scheduler=SimpleNamespace(max_steps=num_epochs),
                           print_to_log_file=messages.append, messages=messages)


@pytest.mark.parametrize("done, elapsed_s, budget_s, num_epochs, expected", [
    (2, 20.0, 105.0, 50, 10),     # 10 s an epoch: 8 more fit in the 85 s left
    (5, 50.0, 1000.0, 50, 50),    # more would fit than asked for: the maximum stays
    (5, 100.0, 60.0, 50, 5),      # out of time: the loop ends after this epoch
    (1, 100.0, 60.0, 50, 50),     # one epoch is too few to tell
])
def test_epochs_fit_the_budget(done, elapsed_s, budget_s, num_epochs, expected):
    trainer = _trainer(done, num_epochs, 50, budget_s)
    nnUNetTrainerShort._fit_epochs_to_budget(trainer, time.perf_counter() - elapsed_s, 0)
    assert trainer.num_epochs == expected and trainer.lr_scheduler.max_steps == expected


def test_the_epoch_count_grows_back_when_epochs_get_faster():
    trainer = _trainer(10, 20, 60, 1000.0)  # shrunk to 20 earlier; now 10 epochs took 100 s
    nnUNetTrainerShort._fit_epochs_to_budget(trainer, time.perf_counter() - 100.0, 0)
    assert trainer.num_epochs == 60  # 10 + 900 s / 10 s = 100, capped at the 60 asked for


def test_a_continued_run_counts_only_its_own_epochs():
    # resumed at epoch 52; 3 epochs in 30 s since: 10 s an epoch, 175 s left -> 17 more
    trainer = _trainer(55, 120, 120, 205.0)
    nnUNetTrainerShort._fit_epochs_to_budget(trainer, time.perf_counter() - 30.0, 52)
    assert trainer.num_epochs == 55 + 17
