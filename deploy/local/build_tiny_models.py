"""Build tiny random-weight language models for the local vLLM runtime.

No model hub is reachable here, so the local runtime serves models made on the
spot: a 2-layer Llama with a byte-level BPE tokenizer trained on the licence
texts every Debian system has. Their output is gibberish; the protocol around
them is vLLM's own.

Built into MODELS (a folder of plain model folders):
  tiny-chat    with a ChatML chat template (answers /v1/chat/completions)
  tiny-base    without one (answers /v1/completions only)
  tiny-lora    a LoRA adapter of tiny-chat (rank 8 on q_proj and v_proj)
  tiny-rerank  a 2-layer BERT cross-encoder with one label (rerank, score)
  tiny-whisper a 1-layer Whisper (/v1/audio/transcriptions, /translations)
and the first two are also placed in the Hugging Face cache HF_HOME under the ids of
the API document's examples, Qwen/Qwen2.5-0.5B-Instruct (tiny-chat) and gpt2
(tiny-base), so that those examples run offline. They are stand-ins, not those
models.

Usage: python build_tiny_models.py HF_HOME MODELS
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STAND_INS = {"Qwen/Qwen2.5-0.5B-Instruct": "tiny-chat", "gpt2": "tiny-base"}


def corpus() -> list[str]:
    texts = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            texts.append(path.read_text(errors="replace"))
    if not texts:
        texts = ["hello world, the quick brown fox jumps over the lazy dog"] * 100
    return texts


def byte_bpe(special: list[str]) -> Tokenizer:
    """A byte-level BPE of 1,024 tokens trained on corpus(), ``special`` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    tok = byte_bpe(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat:
        fast.chat_template = CHATML
    return fast


def build(folder: Path, chat: bool) -> None:
    torch.manual_seed(0)
    tok = tokenizer(chat)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention needs a head size of 32 or more
        max_position_embeddings=32768,  # long generations for the disconnect test
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def build_lora(folder: Path, base: Path, rank: int = 8) -> None:
    """A PEFT-format adapter of ``base`` with random (non-zero) weights, so
    that its answers differ from the base model's."""
    torch.manual_seed(1)
    config = json.loads((base / "config.json").read_text())
    hidden, head = config["hidden_size"], config["head_dim"]
    out = {"q_proj": config["num_attention_heads"] * head,
           "v_proj": config["num_key_value_heads"] * head}  # fmt: skip
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, width in out.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter = {
        "base_model_name_or_path": str(base),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(out),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2))


def build_cross_encoder(folder: Path) -> None:
    """A BERT sequence classifier with one label: what vLLM serves as a
    cross-encoder (/rerank, /score), with a WordPiece tokenizer that pairs
    texts as [CLS] a [SEP] b [SEP]."""
    torch.manual_seed(2)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        corpus(), trainer=trainers.WordPieceTrainer(vocab_size=1024, special_tokens=special)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = BertForSequenceClassification(config).to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def build_whisper(folder: Path) -> None:
    """A Whisper with the special tokens vLLM writes in its decoder prompt
    (<|startoftranscript|><|en|><|transcribe|><|notimestamps|>), a few
    languages, and the feature extractor of Whisper's 80 mel bins."""
    torch.manual_seed(3)
    languages = ["en", "de", "fr", "es", "it"]
    special = [
        "<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in languages),
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
        "<|notimestamps|>",
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    byte_bpe(special).save(str(folder / "tokenizer.json"))
    end = "<|endoftext|>"
    fast = WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        unk_token=end,
        bos_token=end,
        eos_token=end,
        pad_token=end,
    )
    fast.add_special_tokens({"additional_special_tokens": special[1:]})
    ids = {token: fast.convert_tokens_to_ids(token) for token in (end, "<|startoftranscript|>")}
    config = WhisperConfig(
        vocab_size=len(fast),
        num_mel_bins=80,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=512,  # the local site's --max-model-len
        pad_token_id=ids[end],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
        torch_dtype="float32",
    )
    WhisperForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), fast).save_pretrained(folder)


def cache(hf_home: Path, repo_id: str, source: Path) -> None:
    """Lay ``source`` out as the hub cache does, so ``repo_id`` resolves offline."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # noqa: S324 - a name, not security
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def main() -> int:
    hf_home, models_dir = Path(sys.argv[1]), Path(sys.argv[2])
    for name, chat in (("tiny-chat", True), ("tiny-base", False)):
        build(models_dir / name, chat)
        print(f"built {models_dir / name}")
    build_lora(models_dir / "tiny-lora", models_dir / "tiny-chat")
    build_cross_encoder(models_dir / "tiny-rerank")
    build_whisper(models_dir / "tiny-whisper")
    print(f"built tiny-lora, tiny-rerank and tiny-whisper in {models_dir}")
    for repo_id, name in STAND_INS.items():
        cache(hf_home, repo_id, models_dir / name)
        print(f"cached {name} as {repo_id} in {hf_home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
