"""``base_model: tiny``: a random-weight LLaVA built offline, so the local fine-tuning path runs on any CPU.

A tiny CLIP tower + a tiny Llama + a byte-level BPE tokenizer trained on the dataset's own texts, saved through
``save_pretrained`` so ``AutoProcessor`` / ``AutoModelForImageTextToText`` load it like any downloaded model.
It exists to test the path (data, labels, checkpoints, resume, merge, serving), not to answer questions.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from touchvl import disk

TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_vlm(out_dir: Path | str, texts: list[str], seed: int = 0, vocab_size: int = 1000) -> Path:
    """Save a random-weight LLaVA (tiny CLIP tower, tiny Llama) with a BPE tokenizer trained on ``texts``.

    Everything goes through ``save_pretrained``, so ``AutoProcessor`` / ``AutoModelForImageTextToText``
    load the folder offline like any downloaded model.  Built in a staging folder and swapped in whole.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # byte-level: any text encodes (TouchQA's prompts hold words the training texts never had)
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(texts) or ["It feels smooth."], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TINY_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # <|end|> closes every turn and is the eos: labelled with the assistant's text, so the model learns to stop
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.chat_template = TINY_TEMPLATE
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                # wider than the usual 0.02: with a random lm_head that small, logits stay near
                                # uniform whatever LoRA does, and the loss could not show that training works
                                initializer_range=0.2,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # num_additional_image_tokens=1: CLIP's CLS position, which the "default" strategy then drops
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                  crop_size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               chat_template=TINY_TEMPLATE, num_additional_image_tokens=1)
    with disk.replace_dir(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "TINY_MODEL.md").write_text("Random weights: tests the local fine-tuning path, answers nothing.\n")
    return out_dir


def dataset_texts(path: Path) -> list[str]:
    """Every text of a chat JSONL (for the tiny model's tokenizer)."""
    texts = []
    for _where, record in disk.read_jsonl(path):
        with contextlib.suppress(KeyError, AttributeError, TypeError):  # a text is enough; the trainer checks shapes
            for m in record["messages"]:
                c = m.get("content")
                texts += [c] if isinstance(c, str) else [p["text"] for p in c or [] if p.get("type") == "text"]
    return texts
