"""Writes small CLIP BPE tokenizers (vocab.json + merges.txt) for offline tiny models.

Real checkpoints ship their own tokenizer; tiny test and demo models need one that the
standard ``transformers.CLIPTokenizer`` loads, with whole words for a chosen vocabulary
and byte-level fallback for everything else.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_WORDS = (
    "a an the of in on with and photo picture rendering painting drawing art style cat dog toy "
    "red green blue yellow black white small big large one two cube ball sphere square circle "
    "triangle striped dotted frozen ice beach park room close up clean dark bright cool weird good "
    "nice cropped clay sculpture"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(directory: str, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> None:
    """Writes a CLIPTokenizer directory whose vocabulary holds every byte and ``words``."""
    os.makedirs(directory, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    encoder = bytes_to_unicode()
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = [encoder[b] for b in word.encode("utf-8")]
        if len(symbols) < 2:
            continue
        symbols[-1] += "</w>"
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
