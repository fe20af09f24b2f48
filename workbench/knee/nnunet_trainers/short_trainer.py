"""A short nnU-Net trainer for small CPU-trained models (found through ``nnUNet_extTrainer``).

The stock ``nnUNetTrainer_Nepochs`` variants still run 250 iterations per epoch;
this one also shortens the epochs.  The architecture, loss, augmentation and
inference are the stock ``nnUNetTrainer``'s, so shipped checkpoints may name
``nnUNetTrainer`` and need no custom trainer at inference.

Settings come from the environment (read when the trainer is built):

``WORKBENCH_NNUNET_EPOCHS`` (default 40), ``WORKBENCH_NNUNET_ITERS`` (iterations per
epoch, default 25), ``WORKBENCH_NNUNET_VAL_ITERS`` (default 5),
``WORKBENCH_NNUNET_LR`` (initial learning rate, default nnU-Net's 0.01),
``WORKBENCH_NNUNET_MIRROR_AXES`` (mirroring axes of augmentation and inference,
comma-separated in nnU-Net axis order; default ``0``, the slice axis, left-right
in a sagittal knee scan; empty: none),
``WORKBENCH_NNUNET_THREADS`` (CPU threads of torch, default nnU-Net's all cores),
``WORKBENCH_NNUNET_BUDGET_S`` (optional wall-time budget of the training loop in
seconds: from the second epoch on, the number of epochs is set to what fits, at
most ``WORKBENCH_NNUNET_EPOCHS``, and the polynomial learning-rate schedule
follows it, so the run still ends annealed with ``checkpoint_final.pth``).
"""

import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerShort(nnUNetTrainer):
    """``nnUNetTrainer`` with few, short epochs and a single checkpoint at the end."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008  (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.max_epochs = int(os.environ.get("WORKBENCH_NNUNET_EPOCHS", "40"))
        self.num_iterations_per_epoch = int(os.environ.get("WORKBENCH_NNUNET_ITERS", "25"))
        self.num_val_iterations_per_epoch = int(os.environ.get("WORKBENCH_NNUNET_VAL_ITERS", "5"))
        if "WORKBENCH_NNUNET_LR" in os.environ:
            self.initial_lr = float(os.environ["WORKBENCH_NNUNET_LR"])
        self.save_every = 10 ** 6
        threads = os.environ.get("WORKBENCH_NNUNET_THREADS")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))  # nnUNetv2_train takes every core; two runs side by side thrash
        budget = os.environ.get("WORKBENCH_NNUNET_BUDGET_S")
        self.time_budget_s = float(budget) if budget else None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # Mirroring only along the first axis (nnU-Net order z, y, x: the slice axis, left-right in a sagittal
        # knee scan).  nnU-Net mirrors along every axis by default, which flips a knee upside down or front to back:
        # femur and tibia then differ only by shape, and a small network trained briefly confuses them.
        # A left-right mirror turns a right knee into a left one (medial/lateral labels keep their meaning).
        rotation, dummy_2d, patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if os.environ.get("WORKBENCH_NNUNET_MIRROR_AXES") is not None:
            text = os.environ["WORKBENCH_NNUNET_MIRROR_AXES"].strip()
            mirror_axes = tuple(int(a) for a in text.split(",") if a.strip()) or None
        else:
            mirror_axes = (0,)
        self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, patch, mirror_axes

    def _fit_epochs_to_budget(self, started: float, first_epoch: int) -> None:
        done = self.current_epoch - first_epoch  # epochs finished in this run (on_epoch_end increments it)
        if self.time_budget_s is None or done < 2:
            return
        elapsed = time.perf_counter() - started
        per_epoch = elapsed / done
        fit = self.current_epoch + int((self.time_budget_s - elapsed) // per_epoch)
        # the count may grow again (up to the maximum asked for) when epochs get faster, e.g. once a
        # run beside this one ends; out of time, the loop ends now
        new = max(self.current_epoch, min(self.max_epochs, fit))
        if new != self.num_epochs:
            self.print_to_log_file(f"Time budget {self.time_budget_s:.0f} s: {per_epoch:.1f} s per epoch, "
                                   f"training {new} epochs instead of {self.num_epochs}")
            self.num_epochs = new
            self.lr_scheduler.max_steps = new

    def run_training(self):
        # the stock loop, but with a number of epochs that may shrink to the time budget
        self.on_train_start()  # a continued run (--c) has loaded its checkpoint and epoch here
        started, first_epoch = time.perf_counter(), self.current_epoch
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train))
                             for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            self._fit_epochs_to_budget(started, first_epoch)
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        # The final validation of fold "all" predicts the training cases: it is skipped (WORKBENCH_NNUNET_SKIP_VAL=1)
        # except for a configuration with a next stage, whose predictions the cascade trains on.
        skip = os.environ.get("WORKBENCH_NNUNET_SKIP_VAL", "0") == "1"
        if skip and self.configuration_manager.next_stage_names is None:
            self.print_to_log_file("Final validation skipped (WORKBENCH_NNUNET_SKIP_VAL=1)")
            return
        return super().perform_actual_validation(save_probabilities)
