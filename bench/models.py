"""Encoders for timing (architectures without weights) and the official training forward.

The paper's encoders (ResNet-50, BERT-base) are not in the registry without weights, so the benchmarks
build them here with random initialisation: the cost of a forward pass does not depend on the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from sppscl.stage1.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderUnavailable, ImageEncoder, TextEncoder, feature_trunk, load_text_encoder
from sppscl.stage2.heads import ModelOutput, SPPSCLModel

SEED = 0


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def resnet50_random() -> ImageEncoder:
    """ResNet-50 trunk (``layer4`` map, [2048, 7, 7]) with random weights, as the paper's image encoder."""
    trunk = feature_trunk(_seeded(lambda: torchvision.models.resnet50(weights=None)))
    return ImageEncoder("resnet50 (random init)", trunk, f"random-init seed {SEED}", IMAGENET_MEAN, IMAGENET_STD)


def tiny_cnn_random(channels: int) -> ImageEncoder:
    """A three-layer CNN, 224 -> [channels, 7, 7]: the quick profile's stand-in for ResNet-50."""
    body = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 7, stride=4, padding=3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, stride=4, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
    )
    return ImageEncoder("tiny cnn (random init)", body, f"random-init seed {SEED}", IMAGENET_MEAN, IMAGENET_STD)


def bert_random(tiny: bool, max_length: int, layers: int) -> TextEncoder:
    """BERT-base (``BertConfig()``: 12 layers x 768) with random weights, or a 4-layer x 32 BERT when ``tiny``.

    BERT-base uses MiniLM-L6's tokenizer, which is bert-base-uncased's 30,522-word-piece vocabulary; where its package
    is not installed (a GPU node's own Python), tiny-bert's generated vocabulary tokenizes instead, and the name says so.
    """
    from transformers import BertConfig, BertModel

    name = "tiny bert (random init)" if tiny else "bert-base (random init)"
    if tiny:
        tokenizer = load_text_encoder("tiny-bert").tokenizer
        config = BertConfig(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
        )
    else:
        try:
            tokenizer = load_text_encoder("minilm-l6").tokenizer
        except EncoderUnavailable:
            tokenizer = load_text_encoder("tiny-bert").tokenizer
            name = "bert-base (random init, tiny-bert's tokenizer)"
        config = BertConfig()
    model = _seeded(lambda: BertModel(config))
    return TextEncoder(name, model, tokenizer, f"random-init seed {SEED}", max_length=max_length, layers=layers)


class OfficialWay(nn.Module):
    """The official training forward: both encoders, then the heads, on every call.

    Called as ``model(pixels, input_ids, attention_mask)`` so that stage two's ``two_step_update`` drives it
    unchanged: its two forwards per batch then run the encoders twice, as the official two-step does.
    Encoders are frozen (forward under ``no_grad``) but follow the module's train mode, as officially.
    The heads see every one of the ``max_length`` padded positions: the official text pooling reads padding.
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, heads: SPPSCLModel) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.heads = heads
        self.encoder_seconds = 0.0
        self.encoder_calls = 0

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> ModelOutput:
        t0 = time.perf_counter()
        with torch.no_grad():
            image = self.image_encoder(pixels)  # (B, C, h, w)
            tokens = self.text_encoder(input_ids, attention_mask.long())  # (B, max_length, L, H)
        self.encoder_seconds += time.perf_counter() - t0
        self.encoder_calls += 1
        every_position = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.heads(image, tokens, every_position)
