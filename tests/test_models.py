"""Model factory: every model ends in `classifier: nn.Linear` fed the penultimate feature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.models import MODEL_NAMES, build_model

# mnist/fashionmnist, cifar, sklearn digits, mnist1d, a synthetic feature vector,
# a 2-channel signal and a non-square image.
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8), (40,), (32,), (2, 17), (3, 12, 20)]
NUM_CLASSES = 7
BATCH = 4


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_returns_the_classifier_output_on_the_penultimate_feature(
    name: str, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, NUM_CLASSES, width=0.125).eval()
    assert isinstance(model.classifier, nn.Linear)
    captured: list[torch.Tensor] = []
    handle = model.classifier.register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0])
    )
    x = torch.randn(BATCH, *shape)
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert len(captured) == 1
    features = captured[0]
    assert features.shape == (BATCH, model.classifier.in_features)
    # Nothing may follow the classifier: the logits are exactly W h + b.
    torch.testing.assert_close(logits, model.classifier(features), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_trains_in_train_mode(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 3, width=0.125).train()
    x, y = torch.randn(BATCH, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first = next(p for p in model.parameters() if p.dim() > 1)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_width_scales_hidden_and_channel_counts() -> None:
    assert build_model("mlp", (1, 28, 28), 10).classifier.in_features == 512
    assert build_model("mlp", (1, 28, 28), 10, width=0.5).classifier.in_features == 256
    assert build_model("resnet9", (3, 32, 32), 10, width=0.25).classifier.in_features == 128
    assert build_model("vgg9", (3, 32, 32), 10, width=2.0).classifier.in_features == 1024
    assert build_model("resnet18", (3, 32, 32), 10, width=0.5).classifier.in_features == 256
    assert build_model("resnet50", (3, 32, 32), 10, width=0.125).classifier.in_features == 256
    assert build_model("vit", (3, 32, 32), 10).classifier.in_features == 192
    assert build_model("vit", (3, 32, 32), 10, width=0.5).classifier.in_features == 96


def test_default_sizes_are_the_usual_architectures() -> None:
    def count(name: str) -> int:
        model = build_model(name, (3, 32, 32), 10)
        return sum(p.numel() for p in model.parameters())

    # ResNet9 (DAWNBench design) ~6.57M, CIFAR ResNet18 ~11.2M, ResNet50 ~23.5M parameters.
    assert 6.5e6 < count("resnet9") < 6.7e6
    assert 11.1e6 < count("resnet18") < 11.3e6
    assert 23.4e6 < count("resnet50") < 23.6e6


def test_same_seed_builds_the_same_weights() -> None:
    torch.manual_seed(3)
    first = build_model("resnet9", (1, 28, 28), 10, width=0.125).state_dict()
    torch.manual_seed(3)
    second = build_model("resnet9", (1, 28, 28), 10, width=0.125).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("alexnet", (1, 28, 28), 10), "model must be one of mlp, resnet9, vgg9.*'alexnet'"),
        (
            ("resnet9", (1, 2, 28, 28), 10),
            r"model 'resnet9' takes inputs of shape \(L,\), \(C, L\) or \(C, H, W\); "
            r"got input shape \(1, 2, 28, 28\)",
        ),
        (("vgg9", (3, 0, 32), 10), r"model 'vgg9': input_shape must be .*\(3, 0, 32\)"),
        (("mlp", (), 10), r"model 'mlp': input_shape must be a non-empty tuple"),
        (("mlp", (784,), 1), "num_classes must be an integer >= 2, got 1"),
    ],
)
def test_invalid_arguments_are_named(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(*args)


def test_invalid_width_is_named() -> None:
    with pytest.raises(ValueError, match="width must be a positive finite number, got 0"):
        build_model("mlp", (784,), 10, width=0)


def test_mlp_accepts_any_shape() -> None:
    model = build_model("mlp", (2, 3, 4, 5), 4, width=0.125)
    assert model(torch.randn(2, 2, 3, 4, 5)).shape == (2, 4)
