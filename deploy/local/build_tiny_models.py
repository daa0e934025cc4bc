"""Build tiny random-weight language models for the local vLLM runtime.

No model hub is reachable here, so the local runtime serves models made on the
spot: a 2-layer Llama with a byte-level BPE tokenizer trained on the licence
texts every Debian system has. Their output is gibberish; the protocol around
them is vLLM's own.

Two are built into MODELS (a folder of plain model folders):
  tiny-chat  with a ChatML chat template (answers /v1/chat/completions)
  tiny-base  without one (answers /v1/completions only)
and both are also placed in the Hugging Face cache HF_HOME under the ids of
the API document's examples, Qwen/Qwen2.5-0.5B-Instruct (tiny-chat) and gpt2
(tiny-base), so that those examples run offline. They are stand-ins, not those
models.

Usage: python build_tiny_models.py HF_HOME MODELS
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
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
    for repo_id, name in STAND_INS.items():
        cache(hf_home, repo_id, models_dir / name)
        print(f"cached {name} as {repo_id} in {hf_home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
