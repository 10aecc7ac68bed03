"""A byte-level tokenizer of 257 tokens for the debug causal LMs (tiny-gpt2, tiny-llama): every text
is representable, nothing is downloaded or trained, and the vocabulary is small enough that a tiny
model's LM head stays tiny. It has an EOS and no pad token, like GPT-2 and Llama tokenizers."""

from __future__ import annotations

EOS = "<|endoftext|>"


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins, one per byte
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS)
    tok.name_or_path = "byte-level"
    return tok
