"""A real nnU-Net v2 model folder with random weights, for testing the inference path without trained weights.

The plans and dataset.json in ``tests/data/nnunet_plans`` are the tiny plans of the project's knee models
(3d_fullres, 3d_lowres, 3d_cascade_fullres); the networks are built by nnU-Net itself and saved as
nnU-Net checkpoints, so loading and inference run exactly as for trained models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PLANS = Path(__file__).resolve().parent / "data" / "nnunet_plans"
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "3d_cascade_fullres")


def make_random_model(root: Path, labels: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``root/Dataset501_KneeSynth/nnUNetTrainer__nnUNetPlans_tiny__<configuration>/`` for each configuration."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((PLANS / "plans.json").read_text())
    dataset = json.loads((PLANS / "dataset.json").read_text())
    if labels is not None:
        dataset["labels"] = labels
    manager = PlansManager(plans)
    torch.manual_seed(seed)
    for configuration in CONFIGURATIONS:
        folder = root / "Dataset501_KneeSynth" / f"nnUNetTrainer__nnUNetPlans_tiny__{configuration}"
        (folder / "fold_all").mkdir(parents=True, exist_ok=True)
        shutil.copy(PLANS / "plans.json", folder / "plans.json")
        (folder / "dataset.json").write_text(json.dumps(dataset))
        config = manager.get_configuration(configuration)
        n_in = determine_num_input_channels(manager, config, dataset)
        n_out = manager.get_label_manager(dataset).num_segmentation_heads
        network = nnUNetTrainer.build_network_architecture(manager, config, n_in, n_out, enable_deep_supervision=False)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / "fold_all" / "checkpoint_final.pth")
    return root
