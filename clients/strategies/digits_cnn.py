"""Default strategy for scikit-learn digits: a tiny CNN, fully fine-tuned with Adam.

Contract: ftps.ml.strategy (DESIGN.md §4). Records are float32 [1, 8, 8] in [0, 1], 10 classes.
Small enough for fast tests and laptop demos.
"""

from torch import nn

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def build_model() -> nn.Module:
    # 8 -> 4 spatially; ~23k parameters.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


RECIPE = {
    "optimizer": "adam",
    "lr": 5e-3,
    "epochs": 15,
    "batch_size": 16,
    "train": "all",
}

PRETRAIN = {"epochs": 15, "batch_size": 32, "lr": 3e-3}
