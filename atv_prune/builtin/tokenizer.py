"""Closed-vocabulary word-level tokenizer and the LlavaProcessor of the built-in model.

The benchmark's language is a few hundred lower-case words, so a word-level tokenizer keeps
prompts short (one token per word) and the embedding table tiny. It is wrapped in
``PreTrainedTokenizerFast`` with a chat template, and combined with a PIL CLIP image processor
(torchvision is not available) into a real ``LlavaProcessor`` saved in Hugging Face format.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .scenes import IMAGE_SIZE, LETTERS, vocabulary

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


def build_tokenizer(words: list[str] | None = None, option_labels: bool = False) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: special tokens first (ids 0-6), then ``words``.

    With ``option_labels`` a multiple-choice label written as its own word ("A." ... "D.") is one
    token ("a.") instead of two ("a", "."): the label sits right before the option it names, and
    "A" no longer shares its token with the article "a".
    """
    words = vocabulary() if words is None else words
    if option_labels:
        words = [*words, *(f"{letter.lower()}." for letter in LETTERS)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    if option_labels:
        first, last = LETTERS[0].lower(), LETTERS[-1].lower()
        core.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(rf"^[{first}-{last}]\.$|\w+|[^\w\s]+"), behavior="isolated"),
        ])
    else:
        core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, chat_template=CHAT_TEMPLATE,
        model_max_length=512, padding_side="right",
    )
    return tokenizer


def build_image_processor(image_size: int = IMAGE_SIZE) -> CLIPImageProcessorPil:
    """PIL CLIP image processor for square ``image_size`` images, normalised to [-1, 1]."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_processor(patch_size: int, image_size: int = IMAGE_SIZE,
                    tokenizer: PreTrainedTokenizerFast | None = None, option_labels: bool = False) -> LlavaProcessor:
    """The model's ``LlavaProcessor``: ``<image>`` expands to (image_size / patch_size)^2 tokens.

    The CLIP tower adds a CLS token (``num_additional_image_tokens=1``) that the "default"
    feature-selection strategy drops again, so the count equals the patch count.
    """
    tokenizer = tokenizer or build_tokenizer(option_labels=option_labels)
    return LlavaProcessor(
        image_processor=build_image_processor(image_size), tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )
