"""The DeepLab family: torchvision parity for v3, paper structure of v1/v2/v3/v3+, output strides."""

import pytest
import torch
from torch import nn
from torchvision.models import segmentation as tv_segmentation

from pipeline.models import MODEL_BUILDERS, build_model
from pipeline.models.deeplabv3 import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50
from pipeline.models.deeplabv3plus import DeepLabV3Plus

TORCHVISION = {
    "deeplabv3_resnet50": tv_segmentation.deeplabv3_resnet50,
    "deeplabv3_resnet101": tv_segmentation.deeplabv3_resnet101,
    "deeplabv3_mobilenet_v3_large": tv_segmentation.deeplabv3_mobilenet_v3_large,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model: nn.Module) -> None:
    """Fresh BN layers are identities in eval mode; random statistics make misordered layers visible."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


def logits_and_head_input(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the deepest feature map, as its head (classifier or ASPP) receives it."""
    seen = []
    head = model.aspp if isinstance(model, DeepLabV3Plus) else model.classifier
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        hook.remove()
    return logits, seen[0]


def conv_dilations(module: nn.Module) -> list[int]:
    return [m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_deeplabv3_is_torchvision_compatible(name):
    torch.manual_seed(0)
    reference = TORCHVISION[name](weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    randomise_batchnorm(reference)
    reference.eval()
    ours = MODEL_BUILDERS[name](num_classes=21, aux_loss=True).eval()
    assert n_params(ours) == n_params(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        expected = reference(x)
        logits = ours(x)
        with_aux = ours.forward_with_aux(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 21, 65, 65)
    assert (logits - expected["out"]).abs().max() <= 1e-4
    assert (with_aux["aux"] - expected["aux"]).abs().max() <= 1e-4

    plain = MODEL_BUILDERS[name](num_classes=21)
    assert plain.aux_classifier is None
    assert n_params(plain) == n_params(TORCHVISION[name](weights=None, weights_backbone=None, num_classes=21))


def aspp_branch_rates(aspp: nn.Module) -> list[int]:
    return [conv_dilations(branch)[0] for branch in list(aspp.convs)[1:-1]]


@pytest.mark.parametrize("output_stride, rates", [(8, [12, 24, 36]), (16, [6, 12, 18])])
def test_deeplabv3_aspp_has_five_branches_with_the_papers_rates(output_stride, rates):
    model = deeplabv3_resnet50(output_stride=output_stride)
    aspp = model.classifier[0]
    assert len(aspp.convs) == 5
    assert aspp.convs[0][0].kernel_size == (1, 1)
    assert isinstance(aspp.convs[-1][0], nn.AdaptiveAvgPool2d)
    assert aspp_branch_rates(aspp) == rates
    # Dilation replaces the stride of layer4 (OS 16) or of layer3 and layer4 (OS 8).
    assert model.backbone.layer3[0].conv2.stride == ((1, 1) if output_stride == 8 else (2, 2))
    assert model.backbone.layer4[0].conv2.stride == (1, 1)


def test_mobilenet_keeps_torchvision_rates_unless_an_output_stride_is_asked_for():
    assert aspp_branch_rates(deeplabv3_mobilenet_v3_large().classifier[0]) == [12, 24, 36]
    assert aspp_branch_rates(deeplabv3_mobilenet_v3_large(output_stride=16).classifier[0]) == [6, 12, 18]
    os8 = deeplabv3_mobilenet_v3_large(output_stride=8)
    assert aspp_branch_rates(os8.classifier[0]) == [12, 24, 36]
    # The stride-16 stage runs at rate 2 and the last stage, already dilated by torchvision, at 4.
    assert set(conv_dilations(os8.backbone["7"])) == {2} and set(conv_dilations(os8.backbone["15"])) == {4}


@pytest.mark.parametrize("output_stride, unit_rate", [(16, 2), (8, 4)])
def test_multi_grid_sets_the_rates_of_the_layer4_blocks(output_stride, unit_rate):
    model = deeplabv3_resnet50(output_stride=output_stride, multi_grid=(1, 2, 4))
    convs = [block.conv2 for block in model.backbone.layer4]
    assert [c.dilation[0] for c in convs] == [unit_rate, 2 * unit_rate, 4 * unit_rate]
    assert all(c.padding == c.dilation for c in convs)  # same-size output, so the residual adds up
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)
    # Without multi-grid torchvision's rates stay: the first block keeps the previous stage's rate.
    plain = deeplabv3_resnet50(output_stride=output_stride)
    assert [b.conv2.dilation[0] for b in plain.backbone.layer4] == [unit_rate // 2, unit_rate, unit_rate]
    with pytest.raises(ValueError, match="one unit rate per layer4 block"):
        deeplabv3_resnet50(multi_grid=(1, 2))


def test_deeplabv2_sums_four_atrous_classifiers():
    model = build_model("deeplabv2_resnet101", num_classes=5).eval()
    head = model.classifier
    assert len(head) == 4
    assert [(c.dilation[0], c.padding[0], c.kernel_size, c.in_channels, c.out_channels) for c in head] == [
        (r, r, (3, 3), 2048, 5) for r in (6, 12, 18, 24)
    ]
    features = torch.randn(1, 2048, 9, 11)
    with torch.no_grad():
        branches = [conv(features) for conv in head]
        assert torch.allclose(head(features), branches[0] + branches[1] + branches[2] + branches[3], atol=1e-5)
    assert model.backbone.layer3[1].conv2.dilation == (2, 2) and model.backbone.layer4[1].conv2.dilation == (4, 4)


def test_deeplabv1_largefov_structure():
    model = build_model("deeplabv1_vgg16", num_classes=5)
    features = list(model.backbone.values())
    pools = [m for m in features if isinstance(m, nn.MaxPool2d)]
    assert [p.stride for p in pools] == [2, 2, 2, 1, 1] and all(p.kernel_size == 3 for p in pools)
    conv5 = [m for m in features[features.index(pools[3]) :] if isinstance(m, nn.Conv2d)]
    assert len(conv5) == 3 and all(c.dilation == (2, 2) and c.padding == (2, 2) for c in conv5)
    fc6, fc7, fc8 = [m for m in model.classifier if isinstance(m, nn.Conv2d)]
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)
    assert (fc7.kernel_size, fc7.out_channels, fc8.out_channels) == ((1, 1), 1024, 5)
    assert sum(isinstance(m, nn.Dropout) for m in model.classifier) == 2
    assert next(
        m
        for m in build_model("deeplabv1_vgg16", num_classes=5, output_stride=16).classifier
        if isinstance(m, nn.Conv2d)
    ).dilation == (6, 6)


@pytest.mark.parametrize("name", ["deeplabv3plus_resnet101", "deeplabv3plus_xception65"])
@pytest.mark.parametrize("output_stride, rates", [(16, [6, 12, 18]), (8, [12, 24, 36])])
def test_deeplabv3plus_decoder_and_separable_convs(name, output_stride, rates):
    model = build_model(name, num_classes=5, output_stride=output_stride).eval()
    assert isinstance(model, DeepLabV3Plus)
    with torch.no_grad():
        low_level, high_level = model.backbone(torch.randn(1, 3, 64, 96))
    assert low_level.shape[-2:] == (16, 24)  # stride 4
    assert high_level.shape[-2:] == (64 // output_stride, 96 // output_stride)
    reduce = model.decoder.reduce[0]
    assert (reduce.kernel_size, reduce.in_channels, reduce.out_channels) == ((1, 1), low_level.shape[1], 48)
    assert model.decoder.refine[0][0].in_channels == 256 + 48
    assert len(model.aspp.branches) == 5 and [b[0].dilation[0] for b in model.aspp.branches[1:4]] == rates
    spatial = [
        m
        for part in (model.aspp, model.decoder)
        for m in part.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(spatial) == 5 and all(m.groups == m.in_channels for m in spatial)  # 3 ASPP + 2 decoder, all depthwise


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_output_stride_and_full_resolution_logits(name, output_stride):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, output_stride=output_stride).eval()
    assert model.output_stride == output_stride
    logits, features = logits_and_head_input(model, torch.randn(1, 3, 97, 129))
    # Every stride-2 layer pads so that it keeps ceil(size / 2) positions: no border row is lost.
    assert features.shape[-2:] == (-(-97 // output_stride), -(-129 // output_stride))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 4, 97, 129) and torch.isfinite(logits).all()


def test_builders_default_to_the_papers_output_stride():
    strides = {name: build_model(name, num_classes=2).output_stride for name in MODEL_BUILDERS}
    assert strides == {
        "deeplabv1_vgg16": 8,
        "deeplabv2_resnet101": 8,
        "deeplabv3_resnet50": 8,
        "deeplabv3_resnet101": 8,
        "deeplabv3_mobilenet_v3_large": 16,
        "deeplabv3plus_resnet101": 16,
        "deeplabv3plus_xception65": 16,
        "deeplabv3plus_demo": 16,
    }


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown model 'deeplabv4'"):
        build_model("deeplabv4", num_classes=2)
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        build_model("deeplabv2_resnet101", num_classes=2, output_stride=32)
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        build_model("deeplabv1_vgg16", num_classes=2)(torch.randn(1, 1, 33, 33))


_HEAVY = {
    "deeplabv1_vgg16",
    "deeplabv2_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3plus_resnet101",
    "deeplabv3plus_xception65",
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in MODEL_BUILDERS]
)
def test_every_model_satisfies_the_protocol(name):
    from pipeline.models import DEFAULT_WEIGHTS, SegmentationModel, default_weights
    from pipeline.models.checkpoints import num_classes_in

    model = MODEL_BUILDERS[name](num_classes=3, output_stride=16).eval()
    assert isinstance(model, SegmentationModel)
    assert isinstance(model.backbone, nn.Module) and model.output_stride == 16
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 3, 65, 65)
    assert num_classes_in(model.state_dict()) == 3
    if name in DEFAULT_WEIGHTS:  # v1, v2 and the v3+ paper models have no published weights yet
        assert default_weights(name).model == name


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in MODEL_BUILDERS]
)
def test_a_checkpoint_loads_into_a_model_built_on_the_meta_device(name, tmp_path):
    """load_model builds on the meta device and takes the checkpoint's tensors: the same logits as the
    model that was saved, every tensor restored, in the model's dtype (an fp16 file loads as fp32)."""
    from safetensors.torch import save_file

    from pipeline.inference.multiscale import load_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=3, output_stride=16).eval()
    randomise_batchnorm(model)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in half.items()}, str(tmp_path / "h.safetensors"))
    loaded = load_model(name, str(tmp_path / "m.safetensors"), output_stride=16).model
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    from_half = load_model(name, str(tmp_path / "h.safetensors"), output_stride=16).model
    assert all(p.dtype == torch.float32 for p in from_half.parameters())
