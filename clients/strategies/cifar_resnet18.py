"""CIFAR-10 with torchvision's ResNet-18 (the FT-PrivacyScore paper's setting), fully fine-tuned.

Contract: ftps.ml.strategy (DESIGN.md §4). Records are float32 [3, 32, 32] in [0, 1], 10 classes
(``ftps.ml.datasets.load_cifar10`` reads the standard python CIFAR-10 layout). Nothing is
downloaded: ``build_model()`` is the architecture only and the base weights are the builder's
upload, a safetensors state dict of this model (e.g. trained with PRETRAIN on the builder's own
CIFAR-10 split by ``ftps.ml.pretrain.pretrain_base_model``).

Adapted to 32x32 images as usual for CIFAR: a 3x3 stride-1 stem and no max-pool (the ImageNet
stem would shrink 32x32 to 8x8 before the first residual block). ~11.2M parameters: on CPU a
model costs minutes, on a GPU seconds; the worker stacks models on CUDA (ftps/ml/engines.py).
"""

import torchvision
from torch import nn

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def build_model() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    # Unused by RECIPE below. With "cache_features": True and "train": ["layer4.", "fc."], only
    # the last residual stage and the classifier fine-tune, on cached layer3 features.
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1,
                          model.layer2, model.layer3)
    head = nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1), model.fc)
    return trunk, head


RECIPE = {
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "epochs": 10,
    "batch_size": 64,
    "train": "all",
    "augment": ["hflip", "random-crop:4"],
    "tta": ["hflip"],
}

# Builds a base model from scratch on the builder's split (GPU advised: ~30 epochs).
PRETRAIN = {"epochs": 30, "batch_size": 128, "lr": 0.05}
