"""Text (UMT5) and image (CLIP ViT) encoders: run once per request, return plain tensors any rank can receive.

Text, as Diffusers' ``WanPipeline._get_t5_prompt_embeds`` and the official ``T5EncoderModel``:
the prompt is cleaned (``ftfy`` when installed, HTML unescaped, whitespace collapsed), tokenised
to at most ``text_len`` tokens with ``</s>`` appended, encoded with its attention mask, then the
features are cut to the prompt's own length and zero-padded back to ``text_len``.

Image (I2V), as Diffusers' ``WanImageToVideoPipeline.encode_image``: the CLIP image processor
(resize shortest edge, centre crop, normalise), the vision tower with hidden states, and the
penultimate layer's output (``[1, 257, 1280]`` for ViT-H/14) -- the official model's
``use_31_block`` features.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from ._libs import quiet_libraries

#: The official Wan2.1 negative prompt (``wan/configs/shared_config.py``), used when a request gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

try:  # Diffusers cleans prompts with ftfy when it is installed; do the same so encodings agree
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def clean_prompt(text: str) -> str:
    """Diffusers' ``prompt_clean``: ftfy fix (if installed), HTML unescape twice, strip, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """UMT5 encoder + tokenizer.

    Args:
        tokenizer: a transformers tokenizer (T5 conventions: ``</s>`` appended, pad id 0).
        model: a ``UMT5EncoderModel`` (eval mode, on its device).
        text_len: tokens kept / padded to (512 for Wan2.1).
    """

    def __init__(self, tokenizer, model, text_len: int = 512):
        self.tokenizer, self.model, self.text_len = tokenizer, model, text_len

    @classmethod
    def load(cls, folder: str | Path, *, device: torch.device, dtype: torch.dtype, text_len: int = 512) -> TextEncoder:
        """Load ``tokenizer/`` and ``text_encoder/`` from a Diffusers Wan folder."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        with quiet_libraries():
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
            model = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype)
        return cls(tokenizer, model.to(device).eval().requires_grad_(False), text_len)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """One prompt -> ``[1, text_len, d_model]`` in the encoder's dtype, zero past the prompt's tokens."""
        inputs = self.tokenizer(
            [clean_prompt(prompt)], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        n = int(mask.gt(0).sum())
        feats = self.model(ids, mask).last_hidden_state
        out = torch.zeros_like(feats)
        out[:, :n] = feats[:, :n]
        return out


class ImageEncoder:
    """CLIP vision tower + its image processor; features of the penultimate layer."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    @classmethod
    def load(cls, folder: str | Path, *, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """Load ``image_processor/`` and ``image_encoder/`` from a Diffusers Wan I2V folder."""
        from transformers import AutoImageProcessor, CLIPVisionModel

        folder = Path(folder)
        with quiet_libraries():
            processor = AutoImageProcessor.from_pretrained(str(folder / "image_processor"))
            model = CLIPVisionModel.from_pretrained(str(folder / "image_encoder"), torch_dtype=dtype)
        return cls(processor, model.to(device).eval().requires_grad_(False))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, image) -> torch.Tensor:
        """A PIL RGB image -> ``[1, tokens, hidden]`` (257 x 1280 for ViT-H/14), the encoder's dtype."""
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
