"""Networks (one definition for 2D and 3D) and safe serialisation."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from voxplain.config import HEADED_MODELS, ModelConfig
from voxplain.models.networks import CNN, VGGGAP, ConvNet
from voxplain.models.registry import NETWORKS, build_model
from voxplain.models.serialization import load_model, load_state_dict_file, save_model


# paper 2's networks have published depths and widths: tests/test_networks_paper2.py
@pytest.mark.parametrize("name", sorted(set(NETWORKS) - set(HEADED_MODELS)))
@pytest.mark.parametrize("shape", [(31, 37, 31), (21, 26, 19), (64, 64), (33, 47)])
def test_networks_accept_odd_2d_and_3d_inputs(name, shape):
    model = build_model(ModelConfig(name=name, input_shape=list(shape), in_channels=2,
                                    n_classes=3, channels=[4, 8, 8, 8]))
    logits = model.eval()(torch.rand(2, 2, *shape))
    assert logits.shape == (2, 3)


def test_paper1_cnn_blocks_are_conv_batchnorm_leaky_relu_then_maxpool():
    model = CNN(input_shape=(16, 16, 16), channels=[4, 8], convs_per_block=[2, 1])
    first = model.features[0]
    assert [type(m) for m in first[0]] == [nn.Conv3d, nn.BatchNorm3d, nn.LeakyReLU]
    assert len(first) == 3 and isinstance(first[2], nn.MaxPool3d)
    assert first[0][0].kernel_size == (3, 3, 3)
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear]
    assert model.classifier[1].in_features == 8 * 4 * 4 * 4


def test_paper3_convnet_strides_one_then_two_with_published_widths():
    model = ConvNet(input_shape=(64, 64))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.classifier[1].in_features == 256 * 8 * 8


def test_vgg_gap_logits_are_a_linear_function_of_pooled_features():
    model = VGGGAP(input_shape=(24, 24, 24), channels=[4, 8]).eval()
    x = torch.rand(3, 1, 24, 24, 24)
    features = model.features(x)
    expected = model.classifier[1](features.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(model(x), expected)


def test_unknown_model_and_bad_block_counts_are_refused():
    with pytest.raises(ValueError, match="convs_per_block must give one value per block"):
        CNN(input_shape=(8, 8), channels=[4, 8], convs_per_block=[1, 2, 3])
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        CNN(input_shape=(8,))
    with pytest.raises(ValueError, match="input_shape"):
        build_model(ModelConfig(name="cnn"))


def test_saved_model_reloads_with_identical_outputs(tmp_path):
    config = ModelConfig(name="cnn", input_shape=[16, 20, 16], channels=[4, 8])
    torch.manual_seed(0)
    model = build_model(config).eval()
    model.features[0][0][1].running_mean += 0.3  # buffers are saved too
    save_model(tmp_path, model, config, ["CN", "AD"], {"fold": 1})
    loaded, description = load_model(tmp_path)
    x = torch.rand(2, 1, 16, 20, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert description["classes"] == ["CN", "AD"] and description["fold"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


class _Exploit:
    """Pickling this object makes unpickling run ``Path.touch(target)``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(marker)}, checkpoint)
    with open(checkpoint, "rb") as stream:  # the file really is an exploit for a plain unpickler
        assert b"touch" in stream.read()
    with pytest.raises(ValueError, match="refused to load"):
        load_state_dict_file(checkpoint)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    torch.testing.assert_close(load_state_dict_file(plain)["weight"], torch.ones(2))


def test_a_pickle_in_place_of_safetensors_weights_is_not_executed(tmp_path):
    config = ModelConfig(name="cnn", input_shape=[8, 8], channels=[4])
    save_model(tmp_path, build_model(config), config, ["a", "b"])
    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path)
    assert not marker.exists()
