"""Encoders: output shapes, unit norm, fixed Sobel, probe features."""
import pytest
import torch

from nat_ext.models import Sobel, build_model


def test_convnet_outputs_unit_vectors_and_features():
    torch.manual_seed(0)
    m = build_model("convnet", 32).eval()
    x = torch.randn(5, 1, 28, 28)
    y = m(x)
    assert y.shape == (5, 32)
    assert torch.allclose(y.norm(dim=1), torch.ones(5), atol=1e-5)
    assert m.features(x, "conv4", grid=2).shape == (5, 64 * 4)
    assert m.features(x, "conv2", grid=1).shape == (5, 32)
    assert m.features(x, "pixels").shape == (5, 784)
    with pytest.raises(ValueError, match="layer"):
        m.features(x, "conv9")


def test_sobel_is_fixed_and_computes_gradients():
    m = build_model("convnet", 8, sobel=True)
    assert not any("sobel" in name for name, _ in m.named_parameters()), "Sobel weights are trainable"
    assert "sobel.weight" in m.state_dict()
    ramp = torch.arange(8.0).repeat(8, 1).view(1, 1, 8, 8)  # intensity grows along x
    g = Sobel()(ramp.repeat(1, 3, 1, 1))
    assert torch.allclose(g[0, 0, 2:-2, 2:-2], torch.full((4, 4), -8.0))  # horizontal gradient
    assert torch.allclose(g[0, 1, 2:-2, 2:-2], torch.zeros(4, 4))


def test_resnet_and_alexnet_shapes():
    torch.manual_seed(0)
    r = build_model("resnet18", 16, in_channels=3, small_input=True).eval()
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert r.features(torch.randn(2, 3, 32, 32), "layer4").shape == (2, 512 * 4)
    a = build_model("alexnet", 16, sobel=True, small_input=False).eval()
    assert a(torch.randn(2, 3, 224, 224)).shape == (2, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg", 8)
    with pytest.raises(ValueError, match="dim"):
        build_model("convnet", 0)
