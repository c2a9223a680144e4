"""Default strategy for Fashion-MNIST: a small CNN, fully fine-tuned with Adam.

Contract: ftps.ml.strategy (DESIGN.md §4). Records are float32 [1, 28, 28] in [0, 1], 10 classes.
The recipe is chosen so that fine-tuning on ~100 records for a few epochs fits them closely:
the membership signal the privacy score measures, at well under a second per model on 2 CPU cores.
"""

from torch import nn

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def build_model() -> nn.Module:
    # 28 -> 14 -> 7 spatially; ~160k parameters, most in the first dense layer.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 96),
        nn.ReLU(),
        nn.Linear(96, NUM_CLASSES),
    )


RECIPE = {
    "optimizer": "adam",
    "lr": 2e-3,
    "epochs": 10,
    "batch_size": 16,
    "weight_decay": 0.0,
    "train": "all",
    "augment": [],
    "tta": [],
}

# Builds the base model: 5 epochs over the 20k pretraining images (~10 s on 2 CPU cores,
# ~87% test accuracy).
PRETRAIN = {"epochs": 5, "batch_size": 128, "lr": 2e-3}
