"""Closed-vocabulary word-level tokenizer and the LlavaProcessor of the built-in model.

The benchmark's language is a few hundred lower-case words, so a word-level tokenizer keeps
prompts short (one token per word) and the embedding table tiny. It is wrapped in
``PreTrainedTokenizerFast`` with a chat template, and combined with a PIL CLIP image processor
(torchvision is not available) into a real ``LlavaProcessor`` saved in Hugging Face format.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .scenes import CANVASES, vocabulary

#: The image side of generation 1, the default of the builders below.
DEFAULT_IMAGE_SIZE = CANVASES[1].image_size

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"
IMAGE, USER, ASSISTANT = "<image>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, USER, ASSISTANT)

# User turns: the image (where its content item stands) then the text; assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|user|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: special tokens first (ids 0-6), then ``words``."""
    words = vocabulary() if words is None else words
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, chat_template=CHAT_TEMPLATE,
        model_max_length=512, padding_side="right",
    )
    return tokenizer


def build_image_processor(image_size: int = DEFAULT_IMAGE_SIZE) -> CLIPImageProcessorPil:
    """PIL CLIP image processor for square ``image_size`` images, normalised to [-1, 1]."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_processor(patch_size: int, image_size: int = DEFAULT_IMAGE_SIZE,
                    tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """The model's ``LlavaProcessor``: ``<image>`` expands to (image_size / patch_size)^2 tokens.

    The CLIP tower adds a CLS token (``num_additional_image_tokens=1``) that the "default"
    feature-selection strategy drops again, so the count equals the patch count.
    """
    tokenizer = tokenizer or build_tokenizer()
    return LlavaProcessor(
        image_processor=build_image_processor(image_size), tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )
