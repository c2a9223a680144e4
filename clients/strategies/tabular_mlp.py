"""Default strategy for the breast-cancer tabular task: a small MLP, fully fine-tuned with AdamW.

Contract: ftps.ml.strategy (DESIGN.md §4). Records are the task's encoded rows, float32 [30]: the 30
measurements standardised with the builder's means and standard deviations (``ftps.records.tabular``);
2 classes (malignant, benign). For another schema, change INPUT_SHAPE to its width.
"""

from torch import nn

INPUT_SHAPE = (30,)
NUM_CLASSES = 2


def build_model() -> nn.Module:
    # ~6k parameters: enough to fit a fine-tuning set of a few hundred rows exactly (so members
    # leave a measurable trace), small enough that one model fine-tunes in a fraction of a second.
    return nn.Sequential(
        nn.Linear(INPUT_SHAPE[0], 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


# 40 epochs fit every member (training accuracy 1.0) while rows held out stay at the base model's
# ~93%; more epochs or a wider net left the membership signal where it is (batch AUC ~0.59) on this
# nearly separable data, where only unusual rows are exposed.
RECIPE = {
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 1e-2,
    "epochs": 40,
    "batch_size": 16,
    "train": "all",
}

PRETRAIN = {"epochs": 30, "batch_size": 16, "lr": 1e-3}
