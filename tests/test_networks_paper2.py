"""Paper 2's networks (VGG16, VGG19, ResNet-50 with a gap or fc head; table 1): torchvision's
parameter counts and state-dict names, 2D and 3D forward passes, the heads CAM needs and refuses,
the default Grad-CAM layer, and initial weights loaded by name from a local file.

torchvision does not import with our CPU torch, so its definitions are written out by hand here
(torchvision/models/vgg.py ``cfgs["D"]``/``cfgs["E"]``, resnet.py ``Bottleneck``). Published-size
networks are built on the ``meta`` device where only shapes matter (no memory, no arithmetic).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from safetensors.torch import save_file
from torch import nn

from voxplain.config import ModelConfig
from voxplain.explain.cam import CAM, GradCAM
from voxplain.explain.layers import LayerChoice, choose_cam_layer
from voxplain.models.registry import build_model
from voxplain.models.serialization import (
    initial_model,
    load_model,
    load_weights_by_name,
    save_model,
)

#: ImageNet networks at 3 channels and 1000 classes, as torchvision.models builds them.
TORCHVISION_PARAMETERS = {"vgg16": 138_357_544, "vgg19": 143_667_240, "resnet50": 25_557_032}
#: Indices of the convolutions in torchvision's ``features`` (conv, ReLU, ..., max-pool).
VGG_CONVS = {"vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
             "vgg19": [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]}
VGG_POOLS = {"vgg16": [4, 9, 16, 23, 30], "vgg19": [4, 9, 18, 27, 36]}
SMALL = {"vgg16": [4, 8, 8, 16, 16], "vgg19": [4, 8, 8, 16, 16], "resnet50": [4, 4, 8, 8]}


def on_meta(**settings) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(**settings))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETERS))
def test_parameter_counts_are_torchvisions_in_2d_with_the_original_heads(name):
    model = on_meta(name=name, input_shape=[224, 224], in_channels=3, n_classes=1000)
    assert parameter_count(model) == TORCHVISION_PARAMETERS[name]


def test_batch_norm_vggs_are_torchvisions_vgg_bn_in_count_and_names():
    # torchvision's published counts of vgg16_bn and vgg19_bn (3 channels, 1000 classes)
    counts = {"vgg16": 138_365_992, "vgg19": 143_678_248}
    for name, count in counts.items():
        model = on_meta(name=name, batch_norm=True, input_shape=[224, 224], in_channels=3,
                        n_classes=1000)
        assert parameter_count(model) == count
    keys = on_meta(name="vgg16", batch_norm=True, input_shape=[64, 64], n_classes=3).state_dict()
    # vgg16_bn: conv 0, bn 1, relu 2, conv 3, bn 4, relu 5, pool 6, conv 7, ...
    assert {"features.0.weight", "features.1.running_var", "features.3.weight",
            "features.4.weight", "features.7.weight", "features.41.weight"} <= set(keys)
    with pytest.raises(ValueError, match="batch_norm applies to vgg16 and vgg19"):
        ModelConfig(name="resnet50", batch_norm=True)


def test_the_other_heads_count_what_they_add_to_the_convolutions():
    convolutions = {"vgg16": 14_714_688, "vgg19": 20_024_384}  # features of torchvision's VGGs
    for name, features in convolutions.items():
        gap = on_meta(name=name, head="gap", input_shape=[256, 256], in_channels=3, n_classes=3)
        assert parameter_count(gap) == features + 512 * 3 + 3
    resnet_body = TORCHVISION_PARAMETERS["resnet50"] - (2048 * 1000 + 1000)
    fc = on_meta(name="resnet50", head="fc", input_shape=[256, 256], in_channels=3, n_classes=3)
    hidden = (2048 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert parameter_count(fc) == resnet_body + hidden + 4096 * 3 + 3


def expected_vgg_keys(name: str) -> list[str]:
    convs = [f"features.{i}.{kind}" for i in VGG_CONVS[name] for kind in ("weight", "bias")]
    return convs + [f"classifier.{i}.{kind}" for i in (0, 3, 6) for kind in ("weight", "bias")]


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_vgg_state_dict_keys_and_layers_are_torchvisions(name):
    model = on_meta(name=name, input_shape=[224, 224], in_channels=3, n_classes=1000)
    assert list(model.state_dict()) == expected_vgg_keys(name)
    assert [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)] == \
        VGG_POOLS[name]
    assert all(isinstance(model.features[i + 1], nn.ReLU) for i in VGG_CONVS[name])
    assert model.features[0].weight.shape == (64, 3, 3, 3)
    assert model.avgpool.output_size == 7
    assert model.classifier[0].weight.shape == (4096, 512 * 7 * 7)
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]


def test_resnet50_state_dict_keys_and_strides_are_torchvisions():
    model = on_meta(name="resnet50", input_shape=[224, 224], in_channels=3, n_classes=1000)
    state = model.state_dict()
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = (["conv1.weight"] + [f"bn1.{k}" for k in norm]
                + [f"layer1.0.{m}.weight" for m in ("conv1", "conv2", "conv3")]
                + ["layer1.0.downsample.0.weight"] + [f"layer1.0.downsample.1.{k}" for k in norm]
                + [f"layer3.5.bn3.{k}" for k in norm] + ["layer4.2.conv3.weight", "fc.weight",
                                                         "fc.bias"])
    assert set(expected) <= set(state)
    assert len(state) == 320  # 53 convolutions, 53 batch-norms (5 tensors each), fc (2)
    assert "layer1.1.downsample.0.weight" not in state and "layer5.0.conv1.weight" not in state
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.conv1.weight"].shape == (128, 256, 1, 1)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)
    first = model.layer2[0]  # ResNet v1.5: the stride sits on the 3x3 convolution
    assert (first.conv1.stride, first.conv2.stride, first.downsample[0].stride) == \
        ((1, 1), (2, 2), (2, 2))


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50"])
@pytest.mark.parametrize("head", ["gap", "fc"])
def test_2d_and_3d_forward_give_one_logit_per_class(name, head, one_thread):
    """Published widths; 3D with the VGG fc head (5 max-pools: >= 32 voxels per axis) is the
    one case run with narrower blocks."""
    torch.manual_seed(0)
    fc = {"hidden_units": 32} if head == "fc" else {}
    vgg_fc = name != "resnet50" and head == "fc"
    cases = [((32, 36), None), ((32, 33, 35) if vgg_fc else (16, 17, 19),
                                SMALL[name] if vgg_fc else None)]
    for shape, channels in cases:
        model = build_model(ModelConfig(name=name, head=head, input_shape=list(shape),
                                        in_channels=2, n_classes=3, channels=channels, **fc))
        logits = model.eval()(torch.rand(2, 2, *shape))
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_the_3d_fc_head_pools_vgg_to_3_voxels_per_axis_by_default():
    model = on_meta(name="vgg19", input_shape=[121, 145, 121], n_classes=3)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool3d) and model.avgpool.output_size == 3
    assert model.classifier[0].in_features == 512 * 27
    assert model.features[0].weight.shape == (64, 1, 3, 3, 3)
    pooled = on_meta(name="vgg19", input_shape=[64, 64, 64], pool_size=2, hidden_units=256)
    assert (pooled.classifier[0].in_features, pooled.classifier[0].out_features) == (512 * 8, 256)


def test_the_gap_heads_are_linear_in_the_spatial_mean_of_the_last_feature_maps():
    torch.manual_seed(0)
    for name in ("vgg16", "resnet50"):
        model = build_model(ModelConfig(name=name, head="gap", input_shape=[40, 40],
                                        channels=SMALL[name], n_classes=3)).eval()
        x = torch.rand(2, 1, 40, 40)
        linear = model.classifier[-1]
        features = model.features(x)
        torch.testing.assert_close(model(x), linear(features.mean(dim=(2, 3))))
    vgg = build_model(ModelConfig(name="vgg19", head="gap", input_shape=[32, 32]))
    assert isinstance(vgg.features[-1], nn.ReLU) and len(vgg.features) == 36  # no pool5


def test_dropout_is_the_configs_and_vanishes_in_eval_mode():
    vgg = on_meta(name="vgg16", input_shape=[64, 64], dropout=0.3)
    assert [m.p for m in vgg.classifier if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    resnet = on_meta(name="resnet50", input_shape=[64, 64], dropout=0.2)
    assert resnet.dropout.p == 0.2 and resnet.classifier[0] is resnet.dropout


def test_settings_that_do_not_apply_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"\[2, 2, 3, 3, 3\] convolutions per block"):
        on_meta(name="vgg16", input_shape=[64, 64], convs_per_block=[2, 2, 4, 4, 4])
    on_meta(name="vgg19", input_shape=[64, 64], convs_per_block=[2, 2, 4, 4, 4])  # its own
    with pytest.raises(ValueError, match="convs_per_block does not apply"):
        on_meta(name="resnet50", input_shape=[64, 64], convs_per_block=[1])
    with pytest.raises(ValueError, match="channels must give one value per block"):
        on_meta(name="vgg16", input_shape=[64, 64], channels=[4, 8, 8, 8])
    with pytest.raises(ValueError, match="pool_size and hidden_units set the fc head"):
        on_meta(name="resnet50", input_shape=[64, 64], pool_size=2)
    with pytest.raises(ValueError, match="head apply to vgg16, vgg19, resnet50, not to model"):
        ModelConfig(name="cnn", head="gap")
    with pytest.raises(ValueError, match="at least 32 voxels along every axis"):
        on_meta(name="vgg16", input_shape=[31, 64])
    on_meta(name="vgg16", head="gap", input_shape=[16, 64])  # 4 max-pools


@pytest.mark.parametrize(("name", "layer"), [("vgg19", "features.35"), ("vgg16", "features.29"),
                                             ("resnet50", "layer4.2.relu3")])
@pytest.mark.parametrize("head", ["gap", "fc"])
def test_the_default_cam_layer_is_the_activated_output_of_the_last_block(name, layer, head):
    """Paper 2, fig. 1: VGG19 ``block5_conv4`` (with its ReLU) at 16x16 for 256x256 inputs. For
    ResNet-50 the last bottleneck's output, after its final ReLU (``relu3``, whose output is
    the block's)."""
    model = on_meta(name=name, head=head, input_shape=[256, 256], in_channels=3, n_classes=3)
    grid = (8, 8) if name == "resnet50" else (16, 16)
    assert choose_cam_layer(model, (256, 256), 3) == LayerChoice(layer, grid, False)


def test_the_default_cam_layer_on_real_tensors_at_the_smallest_fine_grids(one_thread):
    """The same choice from a real forward pass, where the last block is exactly 4 voxels wide
    (VGG19 at 64x64, ResNet-50 at 128x128); one pool more and it would be coarse."""
    vgg = build_model(ModelConfig(name="vgg19", head="gap", input_shape=[64, 64]))
    assert choose_cam_layer(vgg, (64, 64), 1) == LayerChoice("features.35", (4, 4), False)
    resnet = build_model(ModelConfig(name="resnet50", input_shape=[128, 128]))
    assert choose_cam_layer(resnet, (128, 128), 1) == LayerChoice("layer4.2.relu3", (4, 4), False)
    # at 64x64 the last stage is 2x2: the deepest activated map of 4x4 is the first block of
    # layer 4 before its strided 3x3 convolution (relu1), deeper than layer 3's output
    assert choose_cam_layer(resnet, (64, 64), 1) == LayerChoice("layer4.0.relu1", (4, 4), False)


def test_grad_cam_at_the_last_bottleneck_agrees_with_captum(one_thread):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet50", input_shape=[64, 64], in_channels=2,
                                    n_classes=3, channels=SMALL["resnet50"])).eval()
    for module in model.modules():  # running statistics that make eval mode not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 2, 64, 64)
    ours = GradCAM(model, layer="layer4.2", normalise=False).explain(x, target=[0, 2])
    captum_model = copy.deepcopy(model)
    theirs = LayerGradCam(captum_model, captum_model.layer4[2]).attribute(
        x, target=[0, 2], relu_attributions=True).detach()
    theirs = LayerAttribution.interpolate(theirs, (64, 64), "bilinear")
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["vgg19", "resnet50"])
def test_cam_on_the_gap_head_weights_the_last_feature_maps_by_the_linear_layer(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, head="gap", input_shape=[48, 48], n_classes=3,
                                    channels=SMALL[name])).eval()
    x = torch.rand(3, 1, 48, 48)
    target = torch.tensor([0, 1, 2])
    maps = CAM(model, normalise=False).explain(x, target)
    features = model.features(x)
    weights = model.classifier[-1].weight[target]
    expected = F.relu((weights[:, :, None, None] * features).sum(1, keepdim=True))
    expected = F.interpolate(expected, size=(48, 48), mode="bilinear", align_corners=False)
    assert expected.abs().max() > 0
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_cam_refuses_the_fc_head(name):
    model = build_model(ModelConfig(name=name, head="fc", input_shape=[32, 32], n_classes=3,
                                    channels=SMALL[name], hidden_units=8, pool_size=1))
    with pytest.raises(ValueError, match="1 global average pooling and 3 linear layers. Use "
                                         "grad_cam instead"):
        CAM(model)


# --- initial weights from a local file -------------------------------------------------------

def small(name: str, **changes) -> ModelConfig:
    """A torchvision-named network with narrow layers: files of a few hundred kB."""
    settings = {"name": name, "input_shape": [32, 32], "channels": SMALL[name],
                "in_channels": 3, "n_classes": 3, **changes}
    if settings.get("head", "fc" if name != "resnet50" else "gap") == "fc":
        settings.setdefault("hidden_units", 16)
    return ModelConfig(**settings)


def imagenet_like_file(folder: Path, config: ModelConfig, suffix: str) -> dict[str, torch.Tensor]:
    """Weights of ``config`` at 1000 classes, with batch-norm statistics away from their
    initial values, saved as ``folder/imagenet.SUFFIX``."""
    torch.manual_seed(123)
    source = build_model(config.model_copy(update={"n_classes": 1000}))
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked += 7
    state = {k: v.detach().contiguous() for k, v in source.state_dict().items()}
    path = folder / f"imagenet.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
@pytest.mark.parametrize(("name", "head_keys"), [
    ("vgg16", {"classifier.6.weight", "classifier.6.bias"}),
    ("resnet50", {"fc.weight", "fc.bias"})])
def test_a_torchvision_style_file_loads_by_name_and_the_1000_class_head_is_skipped(
        tmp_path, caplog, suffix, name, head_keys):
    source = imagenet_like_file(tmp_path, small(name), suffix)
    config = small(name, weights=tmp_path / f"imagenet.{suffix}")
    torch.manual_seed(0)
    untouched = build_model(config).state_dict()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="voxplain"):
        model = initial_model(config)
    state = model.state_dict()
    assert set(state) == set(source)
    body = [key for key in state if key not in head_keys]
    assert all(not torch.equal(source[key], untouched[key]) for key in body
               if source[key].ndim >= 2)  # loading changes every convolution and linear weight
    for key in body:
        assert torch.equal(state[key], source[key]), key
    for key in head_keys:
        assert state[key].shape[0] == 3 and torch.equal(state[key], untouched[key])
    weight = max(head_keys)  # "...weight" after "...bias"
    message = f"{weight} {tuple(state[weight].shape)} vs {(1000, *state[weight].shape[1:])}"
    assert message in caplog.text
    assert f"{len(source) - 2} tensors loaded by name" in caplog.text


def test_another_channel_count_skips_the_first_convolution_and_the_file_must_fit(tmp_path):
    source = imagenet_like_file(tmp_path, small("vgg16"), "safetensors")
    path = tmp_path / "imagenet.safetensors"
    torch.manual_seed(0)
    gray = build_model(small("vgg16", in_channels=1))
    matched = load_weights_by_name(gray, path)
    assert [name for name, *_ in matched.skipped] == [
        "features.0.weight", "classifier.6.weight", "classifier.6.bias"]
    assert matched.skipped[0][1:] == ((4, 1, 3, 3), (4, 3, 3, 3))
    assert torch.equal(gray.features[2].weight, source["features.2.weight"])
    gap = build_model(small("vgg16", head="gap"))  # VGG's fc layers are not in the gap head
    matched = load_weights_by_name(gap, path)
    assert matched.missing == ["classifier.1.weight", "classifier.1.bias"]
    assert sorted(matched.unexpected) == [f"classifier.{i}.{k}" for i in (0, 3, 6)
                                          for k in ("bias", "weight")]
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors: no tensor matches VGG16 by name"):
        load_weights_by_name(gap, other)
    volume = build_model(small("vgg16", input_shape=[32, 32, 32]))  # 2D weights, 3D network
    with pytest.raises(ValueError, match=r"no convolution weight of VGG16 matches by name and "
                       r"shape \(e.g. features.0.weight \(4, 3, 3, 3, 3\) vs \(4, 3, 3, 3\)"):
        load_weights_by_name(volume, path)
    with pytest.raises(FileNotFoundError, match="missing.pth: weights file not found"):
        load_weights_by_name(volume, tmp_path / "missing.pth")


class _Exploit:
    """Unpickling this object runs ``Path.touch(target)``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pth_needing_full_unpickling_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "resnet50.pth"
    state = build_model(small("resnet50")).state_dict()
    torch.save({**state, "payload": _Exploit(marker)}, checkpoint)
    config = small("resnet50", weights=checkpoint)
    with pytest.raises(ValueError, match=r"resnet50.pth: refused to load: .* full unpickling.*"
                                         r"Unsupported global"):
        initial_model(config)
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # what a careless reader would have done
    assert marker.exists()


def test_a_reloaded_trained_model_does_not_read_its_initial_weights_file(tmp_path):
    imagenet_like_file(tmp_path, small("vgg19", head="gap"), "pth")
    weights = tmp_path / "imagenet.pth"
    config = small("vgg19", head="gap", weights=weights)
    model = initial_model(config).eval()
    with torch.no_grad():
        model.classifier[1].bias.fill_(0.5)  # "trained": differs from the file and from init
    save_model(tmp_path / "model", model, config, ["CN", "RRMS", "SPMS"])
    weights.unlink()
    loaded, description = load_model(tmp_path / "model")
    assert description["model"]["weights"] == str(weights)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.slow
def test_training_starts_from_the_weights_file(cohort_tsv, tmp_path, one_thread):
    from safetensors.torch import load_file

    from voxplain.config import TrainConfig
    from voxplain.run import RunFolder
    from voxplain.steps.train import run_train

    model = {"name": "vgg16", "head": "gap", "channels": SMALL["vgg16"]}
    source = imagenet_like_file(tmp_path, ModelConfig(**model, in_channels=1,
                                                      input_shape=[20, 24, 20]), "safetensors")
    config = TrainConfig.model_validate({
        "cohort": cohort_tsv, "out": tmp_path / "run", "folds": 2, "epochs": 1, "batch_size": 4,
        "device": "cpu", "learning_rate": 1e-9, "weight_decay": 0,
        "model": {**model, "weights": tmp_path / "imagenet.safetensors"}})
    run_train(config)
    trained = load_file(str(RunFolder(tmp_path / "run").model_dir(0, 0) / "model.safetensors"))
    convolutions = [key for key in source if key.startswith("features.") and key.endswith("weight")]
    assert len(convolutions) == 13
    for key in convolutions:  # one epoch at a learning rate of 1e-9 leaves the file's weights
        torch.testing.assert_close(trained[key], source[key], atol=1e-6, rtol=0)


def test_deeplift_shap_runs_on_resnet50_whose_relus_are_not_reused():
    # Captum's DeepLift refuses a ReLU module called several times in one forward pass (the
    # torchvision Bottleneck's single `relu`); three modules keep torchvision's state dict
    from voxplain.explain.methods import explainer

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet50", channels=SMALL["resnet50"], input_shape=[32, 32],
                                    in_channels=3, n_classes=3, dropout=0.0)).eval()
    maps = explainer("deeplift_shap", model).explain(torch.rand(2, 3, 32, 32), target=[0, 1])
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()
    assert not any(key.endswith("relu.weight") for key in model.state_dict())
