"""The tiny demo models' tokenizer, processor and chat template, built locally (no Hub).

Same special tokens and ChatML template as LFM2-VL's, so every prompt renders and tokenizes as it
would with the real checkpoints; a byte-level BPE trained on the prompt, the Stanford Cars class and
maker names and some generic English keeps the vocabulary at 1024.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# Image processing: no splitting, 8-pixel patches, 16..48 image tokens per picture
# --------------------------------------------------------------------------------------------

ENCODER_PATCH_SIZE = 8
DOWNSAMPLE_FACTOR = 2
MIN_IMAGE_TOKENS = 16
MAX_IMAGE_TOKENS = 48
# SigLIP2 keeps a square grid of learned position embeddings and interpolates it to each image's
# patch grid; 14x14 covers the largest grid an image can get (48 tokens = 192 patches).
VISION_NUM_PATCHES = 196

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<|image_start|>"
IMAGE_END_TOKEN = "<|image_end|>"
IMAGE_THUMBNAIL_TOKEN = "<|img_thumbnail|>"
MAX_TILE_GRID = 10  # LFM2-VL's processor names tiles up to a 10x10 grid: <|img_row_R_col_C|>

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOT_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    IMAGE_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_THUMBNAIL_TOKEN,
    *(f"<|img_row_{r}_col_{c}|>" for r in range(1, MAX_TILE_GRID + 1) for c in range(1, MAX_TILE_GRID + 1)),
)

DEFAULT_VOCAB_SIZE = 1024

# A ChatML template in the shape of LFM2-VL's: optional bos, one <|im_start|>role ... <|im_end|> block
# per message, content either a string or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This is a photo of a car parked on the street. The car is red, blue, green, yellow, black or white.
What is in this image? Describe the picture in one sentence. Answer with a single word.
Cars, trucks, vans and coupes drive on roads and highways. The driver opened the door of the sedan.
It was a sunny day and the vehicle shone in the light. Modern engines are quiet and efficient.
Please pick one option from the list below and answer with its name only.
You are a helpful assistant. The user asks a question and the assistant answers it.
Hello, how are you today? I am fine, thank you. Which one do you like best?
The image shows a sports car, a convertible, a hatchback, a wagon, a minivan and a pickup.
Numbers like 1, 2, 3, 10, 100, 2007, 2012 appear in model years and prices.
"""


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the chat prompt, every class and maker name, some English."""
    from car_maker_pipeline.data.classes import stanford_cars_class_names
    from car_maker_pipeline.data.makers import KNOWN_MAKERS
    from car_maker_pipeline.model_inputs.prompt import PromptTemplate

    template = PromptTemplate()
    makers = list(KNOWN_MAKERS)
    lines = [template.system, template.user_text(makers), template.user_text(makers[:6])]
    lines += ["system", "user", "assistant"]
    lines += list(stanford_cars_class_names())
    # Makers many times, so every maker name ends up as one or very few tokens.
    lines += [m for _ in range(20) for m in makers]
    lines += [f"The answer is {m}." for m in makers]
    lines += _GENERIC_ENGLISH.splitlines()
    return lines


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE fast tokenizer with LFM2-VL's special tokens and chat template.

    Special tokens come first, so their ids are fixed (`<|pad|>` = 0, `<|startoftext|>` = 1,
    `<image>` = 5, ...) whatever the corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, IM_END_TOKEN, PAD_TOKEN)],
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """`Lfm2VlProcessor` with the tiny tokenizer and an image processor sized for tiny inputs."""
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

    image_processor = Lfm2VlImageProcessor(
        do_image_splitting=False,
        use_thumbnail=False,
        encoder_patch_size=ENCODER_PATCH_SIZE,
        downsample_factor=DOWNSAMPLE_FACTOR,
        min_image_tokens=MIN_IMAGE_TOKENS,
        max_image_tokens=MAX_IMAGE_TOKENS,
        tile_size=ENCODER_PATCH_SIZE * DOWNSAMPLE_FACTOR * 4,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Lfm2VlProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(vocab_size), chat_template=CHAT_TEMPLATE
    )
