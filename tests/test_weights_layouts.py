"""Published weight descriptions, torchvision/timm key layouts, S3 loading and one-line errors."""

import hashlib
import io

import fsspec
import pytest
import timm
import torch
from safetensors.torch import save
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models import segmentation as tv_segmentation

from pipeline.inference.multiscale import load_model
from pipeline.models import DEFAULT_WEIGHTS, MODEL_BUILDERS, build_model
from pipeline.models.checkpoints import load_backbone, load_into, read_checkpoint
from pipeline.models.deeplabv3 import (
    DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1,
    DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1,
    DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1,
)
from pipeline.models.weights import WeightsError

PUBLISHED = [
    (DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1, tv_segmentation.DeepLabV3_ResNet50_Weights),
    (DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1, tv_segmentation.DeepLabV3_ResNet101_Weights),
    (DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1, tv_segmentation.DeepLabV3_MobileNet_V3_Large_Weights),
]


def torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def put_memory(name: str, data: bytes) -> str:
    uri = f"memory://weights-tests/{name}"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


@pytest.fixture(scope="module")
def torchvision_mobilenet():
    """A torchvision DeepLab v3 MobileNetV3 as torchvision ships it: 21 classes, aux head included."""
    torch.manual_seed(0)
    return tv_segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).eval()


@pytest.mark.parametrize("weights, torchvision_enum", PUBLISHED)
def test_published_weights_describe_torchvisions_files(weights, torchvision_enum):
    published = torchvision_enum.COCO_WITH_VOC_LABELS_V1
    assert weights.uri == published.url
    assert weights.uri.endswith(f"-{weights.sha256[:8]}.pth")  # torch.hub's sha256 prefix in the file name
    assert weights.categories[1:] == tuple(published.meta["categories"][1:]) and weights.num_classes == 21
    assert weights.held_out_miou == pytest.approx(published.meta["_metrics"]["COCO-val2017-VOC-labels"]["miou"] / 100)
    preset = published.transforms()
    assert [weights.resize_size] == list(preset.resize_size)
    assert (list(weights.mean), list(weights.std)) == (list(preset.mean), list(preset.std))
    # The file holds the model trained with the auxiliary head: our builder with it has every tensor.
    model = MODEL_BUILDERS[weights.model](num_classes=weights.num_classes, aux_loss=True)
    assert sum(p.numel() for p in model.parameters()) == weights.num_params == published.meta["num_params"]
    assert DEFAULT_WEIGHTS[weights.model] is weights


def test_torchvision_checkpoint_from_s3_with_checksum(s3_env, torchvision_mobilenet):
    data = torch_bytes(torchvision_mobilenet.state_dict())
    digest = hashlib.sha256(data).hexdigest()
    s3_env.mkdir("weights")
    s3_env.pipe("weights/deeplabv3_mobilenet_v3_large_coco.pth", data)
    uri = "s3://weights/deeplabv3_mobilenet_v3_large_coco.pth"

    model, sha, categories = load_model("deeplabv3_mobilenet_v3_large", f"{uri}#sha256={digest}")
    assert sha == digest and len(categories) == 21 and categories[0] == "background"
    assert model.aux_classifier is None  # the training-only head was dropped, not loaded
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        assert (model(x) - torchvision_mobilenet(x)["out"]).abs().max() <= 1e-4
    # torch.hub's 8-digit prefix identifies no file (a 32-bit match can be forged): refused
    with pytest.raises(WeightsError, match="full 64-hex-digit digest") as err:
        load_model("deeplabv3_mobilenet_v3_large", f"{uri}#sha256={digest[:8]}")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match=f"expected sha256 {'0' * 64}, file has {digest}"):
        read_checkpoint(f"{uri}#sha256={'0' * 64}")


def test_safetensors_with_aux_head_into_an_aux_model(torchvision_mobilenet):
    state = {k: v.contiguous() for k, v in torchvision_mobilenet.state_dict().items()}
    uri = put_memory("mobilenet.safetensors", save(state))
    checkpoint = read_checkpoint(uri)
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=21)
    assert set(checkpoint.state_dict) - set(model.state_dict()) == {k for k in state if k.startswith("aux_classifier.")}
    aux_model = MODEL_BUILDERS["deeplabv3_mobilenet_v3_large"](num_classes=21, aux_loss=True)
    load_into(aux_model, checkpoint, uri)
    assert torch.equal(aux_model.state_dict()["aux_classifier.4.weight"], state["aux_classifier.4.weight"])


def test_wrong_class_count_says_expected_and_found(torchvision_mobilenet):
    uri = put_memory("mobilenet21.pth", torch_bytes(torchvision_mobilenet.state_dict()))
    with pytest.raises(WeightsError, match="the model expects 6 classes, the checkpoint has 21") as err:
        load_model("deeplabv3_mobilenet_v3_large", uri, num_classes=6)
    message = str(err.value)
    assert "\n" not in message and "classifier.4.weight (21, 256, 1, 1) vs model (6, 256, 1, 1)" in message


def test_bad_checksum_fragment():
    with pytest.raises(WeightsError, match="bad sha256 'xyz'"):
        read_checkpoint("memory://weights-tests/any.pth#sha256=xyz")


def test_torchvision_imagenet_backbones_load_into_backbone():
    torch.manual_seed(0)
    classifier = resnet50(weights=None)
    model = build_model("deeplabv3_resnet50", num_classes=3)
    load_backbone(model, put_memory("resnet50.pth", torch_bytes(classifier.state_dict())))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, classifier.layer4[2].conv3.weight)

    classifier = mobilenet_v3_large(weights=None)  # keys "features.N...", head "classifier.N..."
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    sha = load_backbone(model, put_memory("mnv3.safetensors", save(state)))
    assert sha == read_checkpoint("memory://weights-tests/mnv3.safetensors").sha256
    assert torch.equal(model.backbone["16"][0].weight, classifier.features[16][0].weight)


def test_timm_imagenet_backbone_loads_into_the_v3plus_backbone():
    torch.manual_seed(0)
    classifier = timm.create_model("xception65", pretrained=False)  # keys "stem.0...", "blocks.3...", "head.fc"
    model = build_model("deeplabv3plus_xception65", num_classes=3)
    uri = put_memory("xception65.pth", torch_bytes(classifier.state_dict()))
    load_backbone(model, uri)
    assert torch.equal(
        model.backbone.blocks_20.stack.conv3.conv_pw.weight, classifier.blocks[20].stack.conv3.conv_pw.weight
    )
    # The same file is no whole model: the error says so instead of listing 700 keys.
    backbone_only = r"holds only backbone weights; pipeline\.models\.checkpoints\.load_backbone"
    with pytest.raises(WeightsError, match=backbone_only):
        load_model("deeplabv3plus_xception65", uri, num_classes=3)


def test_backbone_checkpoint_with_unknown_keys_names_them():
    torch.manual_seed(0)
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3)
    state = mobilenet_v3_large(weights=None).state_dict()
    state["features.17.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"do not fit the backbone: unknown keys features\.17\.extra\.weight$"):
        load_backbone(model, put_memory("extra.pth", torch_bytes(state)))
    # another architecture: nothing fits, and the message stays one line
    with pytest.raises(WeightsError, match=r"unknown keys bn1\.bias, .*\(\+\d+ more\); missing keys 0\.0\.w") as err:
        load_backbone(model, put_memory("resnet.pth", torch_bytes(resnet50(weights=None).state_dict())))
    assert "\n" not in str(err.value)
