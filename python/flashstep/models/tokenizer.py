"""The CLIP BPE tokenizer of the SD text encoders, built on the ``tokenizers`` library.

The pipeline is transformers' ``CLIPTokenizer``: NFC, runs of whitespace -> one space, lower case; split
into words, byte-level BPE with "</w>" ending each word; <|startoftext|> ... <|endoftext|> around the
text; truncated and padded to 77 tokens. The pad token comes from the folder's files: SD 1.x pads with
<|endoftext|>, SD 2.x (and SDXL's second tokenizer) with "!" (id 0). Special tokens are matched in the
raw text before any splitting, as in transformers (so with pad "!", each "!" is its own token).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

MAX_LENGTH = 77
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_text(value: Any) -> str:
    """A special token as written in the config files: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, Mapping) else str(value)


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def special_tokens_of_folder(folder: str) -> Dict[str, str]:
    """bos/eos/unk/pad as transformers resolves them: tokenizer_config.json, overridden by
    special_tokens_map.json unless the config lists its own ``added_tokens_decoder``."""
    tokens = dict(DEFAULT_SPECIAL_TOKENS)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(_read_json(os.path.join(folder, "special_tokens_map.json")))
    for source in sources:
        for key in DEFAULT_SPECIAL_TOKENS:
            if source.get(key) is not None:
                tokens[key] = _token_text(source[key])
    return tokens


class CLIPTokenizer:
    """prompts -> LongTensor (B, max_length) of token ids, padded and truncated (see the module docstring)."""

    def __init__(self, vocab: Dict[str, int], merges: List[Tuple[str, str]], *, bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>",
                 max_length: int = MAX_LENGTH):
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        unique_tokens = list(dict.fromkeys([bos_token, eos_token, unk_token, pad_token]))
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in unique_tokens])
        self.bos_token_id = tokenizer.token_to_id(bos_token)
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        self.pad_token_id = tokenizer.token_to_id(pad_token)
        self.pad_token = pad_token
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos_token, self.eos_token_id), (bos_token, self.bos_token_id), trim_offsets=False, add_prefix_space=False
        )
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=pad_token)
        self.max_length = max_length
        self.backend = tokenizer

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike], max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """A ``tokenizer/`` folder: the vocabulary and merges of tokenizer.json (as transformers prefers it) or
        of vocab.json + merges.txt; tokenizer_config.json and special_tokens_map.json for the special tokens.
        The pipeline around them is always CLIP's, as transformers' CLIPTokenizer rebuilds it."""
        folder = os.fspath(folder)
        tokenizer_json = os.path.join(folder, "tokenizer.json")
        vocab_json, merges_txt = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(tokenizer_json):
            model = _read_json(tokenizer_json)["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        elif os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
            vocab, merges = BPE.read_file(vocab_json, merges_txt)
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")
        return cls(vocab, merges, max_length=max_length, **special_tokens_of_folder(folder))

    def __call__(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """One prompt or B prompts -> (B, max_length) int64 token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self.backend.encode_batch(list(prompts))
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text without the special tokens (words separated by single spaces)."""
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return text.replace("</w>", " ").strip()
