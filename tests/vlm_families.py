"""Random-weight models of real VLM families, built offline, for tests/test_vlm_families.py.

Each family is built from its own transformers config, model and processor classes, with tiny sizes
(1-2 layers, hidden 32-64), a byte-level BPE tokenizer trained on a few texts that carries the family's
special tokens, and the family's real chat template (copied below from the published checkpoints), then
saved with ``save_pretrained`` so ``AutoProcessor`` / ``AutoModelForImageTextToText`` load the folder as
they load a downloaded checkpoint.  Nothing touches the hub.

``FamilySpec.label_text(answer, last)`` is what the template makes of an assistant turn after the generation
prompt: the text the model must learn to produce, its end-of-turn token included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# --- the families' chat templates, as published with their checkpoints --------------------------------
# Qwen/Qwen2-VL-2B-Instruct (chat_template.json; Qwen/Qwen2.5-VL-3B-Instruct has the same)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
# HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3 architecture)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# HuggingFaceTB/SmolVLM2-256M-Video-Instruct (transformers' smolvlm DEFAULT_CHAT_TEMPLATE)
SMOLVLM2_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# llava-hf/llava-1.5-7b-hf (chat_template.json): no end-of-turn token at all, an assistant turn ends with a space
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

CORPUS = ["You describe how surfaces feel to the touch.", "Tactile sample: how does this surface feel?",
          "It feels rough and hard, like brick.", "It feels soft and fuzzy, like moss.",
          "It feels smooth and cool, like glass.", "Compare the two surfaces.", "Thanks!", "You are a helpful assistant.",
          "system user assistant System User Assistant USER: ASSISTANT:", "Still rough.", "Hard."]
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


@dataclass(frozen=True)
class FamilySpec:
    name: str
    build: Callable[[Path], None]
    label_text: Callable[[str, bool], str]
    """What the labelled tokens of an assistant turn decode to (``last``: the conversation's last turn)."""
    vision_prefixes: tuple[str, ...]
    """Module-name fragments of the vision tower and projector (none may get LoRA)."""
    lm_prefix: str
    """Module-name fragment every language-model decoder layer has."""
    notes: dict = field(default_factory=dict)


def _tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str | None = None,
               add_bos: bool = False, metaspace: bool = False, extra: dict | None = None, vocab_size: int = 600):
    """A BPE tokenizer trained on CORPUS, holding ``specials`` (byte-level like GPT-2/Qwen/SmolLM, or Metaspace
    like Llama's sentencepiece when ``metaspace``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if metaspace:
        bpe = Tokenizer(models.BPE(unk_token=unk))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                    " .,:;!?'\"-()\n\u2581"))
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False, initial_alphabet=alphabet))
    if add_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    kwargs = {k: v for k, v in {"bos_token": bos, "unk_token": unk}.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad,
                                   extra_special_tokens=extra or {}, **kwargs)


def _save(out: Path, model, processor, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _qwen_vl(out: Path, v2_5: bool) -> None:
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if v2_5:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tok.chat_template = QWEN2_VL_TEMPLATE  # Qwen2.5-VL publishes the same template
    ids = tok.convert_tokens_to_ids
    patch, merge, temporal = 4, 2, 2
    if v2_5:  # block 0 attends within 16-px windows, block 1 is a full-attention block (as every 8th is in 2.5-VL)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=temporal, window_size=4 * patch * merge,
                      fullatt_block_indexes=[1])
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=temporal)
    config = Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         initializer_range=0.2, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=vision, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    model = Model(config)
    # at most 32x32 pixels: a few image tokens per image (the 48x40 test images become 24x32, 12 tokens)
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    processor = Processor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=merge, temporal_patch_size=temporal),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=merge, temporal_patch_size=temporal),
        tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    _save(out, model, processor, tok)


def build_qwen2_vl(out: Path) -> None:
    _qwen_vl(out, v2_5=False)


def build_qwen2_5_vl(out: Path) -> None:
    _qwen_vl(out, v2_5=True)


def _idefics_like(out: Path, smolvlm2: bool) -> None:
    import torch
    from transformers import LlamaConfig

    template = SMOLVLM2_TEMPLATE if smolvlm2 else SMOLVLM_TEMPLATE
    # SmolVLM's tokenizer: <end_of_utterance> ends a turn and is the eos; <|im_end|> pads
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IDEFICS_SPECIALS] + (["<video>"] * smolvlm2),
                     bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>")
    tok.chat_template = template
    image_size, patch, scale = 32, 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale ** 2  # 4 tokens per image (or per crop)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # images up to 64 px, cut into 32-px crops plus the whole image (SmolVLM's image splitting, scaled down)
    image_kwargs = dict(size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                        do_image_splitting=True)
    torch.manual_seed(0)
    if smolvlm2:
        from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor,
                                  SmolVLMVideoProcessor)

        config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale,
                               image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
        model = SmolVLMForConditionalGeneration(config)
        processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**image_kwargs), tokenizer=tok,
                                     video_processor=SmolVLMVideoProcessor(**image_kwargs), image_seq_len=image_seq_len,
                                     chat_template=template)
    else:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

        config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                                image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
        model = Idefics3ForConditionalGeneration(config)
        processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**image_kwargs), tokenizer=tok,
                                      image_seq_len=image_seq_len, chat_template=template)
    _save(out, model, processor, tok)


def build_smolvlm(out: Path) -> None:
    _idefics_like(out, smolvlm2=False)


def build_smolvlm2(out: Path) -> None:
    _idefics_like(out, smolvlm2=True)


def build_llava15(out: Path) -> None:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    # Llama's tokenizer: sentencepiece-style, <s> prepended to every text, </s> the eos; llava-hf adds <image>, <pad>
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                     add_bos=True, metaspace=True, extra={"image_token": "<image>"})
    tok.chat_template = LLAVA15_TEMPLATE
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                  crop_size={"height": image_size, "width": image_size}),
                               tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                               chat_template=LLAVA15_TEMPLATE, num_additional_image_tokens=1)
    _save(out, model, processor, tok)


FAMILIES = {
    # "<|im_start|>assistant\n" + answer + "<|im_end|>\n": the newline closing the turn is the template's too
    "qwen2_vl": FamilySpec("qwen2_vl", build_qwen2_vl, lambda a, last: f"{a}<|im_end|>\n", ("visual",),
                           "language_model.layers."),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", build_qwen2_5_vl, lambda a, last: f"{a}<|im_end|>\n", ("visual",),
                             "language_model.layers."),
    # "Assistant:" + " " + answer + "<end_of_utterance>\n"
    "smolvlm": FamilySpec("smolvlm", build_smolvlm, lambda a, last: f" {a}<end_of_utterance>\n",
                          ("vision_model", "connector"), "text_model.layers."),
    "smolvlm2": FamilySpec("smolvlm2", build_smolvlm2, lambda a, last: f" {a}<end_of_utterance>\n",
                           ("vision_model", "connector"), "text_model.layers."),
    # "ASSISTANT:" + " " + answer + " ", no end of turn: our Encoder inserts the eos </s> (LLaVA's own training
    # format); the template's trailing space is part of the next turn's "▁USER" token, except after the last turn
    "llava15": FamilySpec("llava15", build_llava15, lambda a, last: f"{a}{' ' * last}</s>",
                          ("vision_tower", "multi_modal_projector"), "language_model.layers."),
}
