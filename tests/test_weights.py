import hashlib

import pytest
import torch
from safetensors.torch import save_file

from pipeline.inference.multiscale import load_model
from pipeline.models import build_model
from pipeline.models.checkpoints import load_into, num_classes_in, read_checkpoint
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS
from pipeline.models.weights import WeightsError


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(0)
    return build_model("deeplabv3plus_demo", num_classes=3).state_dict()


def test_bundled_demo_checkpoint_matches_its_checksum():
    ckpt = read_checkpoint(DEMO_WEIGHTS.uri, expected_sha256=DEMO_WEIGHTS.sha256)
    assert ckpt.sha256 == DEMO_WEIGHTS.sha256
    _, sha, categories = load_model(DEMO_WEIGHTS.model, DEMO_WEIGHTS.uri)
    assert categories == DEMO_WEIGHTS.categories and sha == DEMO_WEIGHTS.sha256


def test_torch_format_with_wrappers_and_checksum_fragment(tmp_path, small_state):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in small_state.items()}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model, sha, categories = load_model("deeplabv3plus_demo", f"{path}#sha256={digest}")
    assert sha == digest and len(categories) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, small_state[k])


def test_checksum_mismatch_is_one_clear_line(tmp_path, small_state):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_state.items()}, str(path))
    with pytest.raises(WeightsError, match="checksum mismatch") as err:
        read_checkpoint(f"{path}#sha256={'0' * 64}")
    assert "\n" not in str(err.value)


def test_wrong_keys_and_class_count_are_named(tmp_path, small_state):
    state = dict(small_state)
    state["extra.weight"] = torch.zeros(1)
    del state["aspp.project.0.0.weight"]
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=r"missing keys aspp\.project\.0\.0\.weight.*unexpected keys extra\.weight"):
        load_model("deeplabv3plus_demo", str(path))
    good = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in small_state.items()}, str(good))
    with pytest.raises(
        WeightsError,
        match="wrong class count: the model expects 5 classes, the checkpoint has 3; "
        r"shape mismatch decoder\.classifier\.bias \(3,\) vs model \(5,\)",
    ):
        load_into(build_model("deeplabv3plus_demo", num_classes=5), read_checkpoint(str(good)), str(good))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights not found"):
        read_checkpoint(str(tmp_path / "nope.pth"))


def test_class_count_comes_from_the_last_classifier_whatever_the_files_order(tmp_path):
    """torchvision's v3 head holds 3 classifier convs (256, 256, then the classes); safetensors stores
    them in an order of its own, and the class count is read from the last by module index."""
    state = build_model("deeplabv3_mobilenet_v3_large", num_classes=6).state_dict()
    path = tmp_path / "v3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, _, categories = load_model("deeplabv3_mobilenet_v3_large", str(path))
    assert len(categories) == 6 and model.classifier[4].out_channels == 6
    shuffled = dict(reversed(list(state.items())))
    assert num_classes_in(shuffled) == num_classes_in(dict(sorted(state.items()))) == 6
