"""Offline CLIP tokenizers and tiny CLIP text-encoder configs, for building text-conditioned pipelines locally.

diffusers' own tests build tiny Stable Diffusion pipelines around ``hf-internal-testing/tiny-random-clip``, a
tokenizer downloaded from the Hub. distill's tests run with no network, so :func:`build_clip_tokenizer` writes a
CLIP byte-level BPE tokenizer from a word list instead: every byte has a token (so any text tokenizes), and each
given word becomes exactly one whole-word token (so prompts made of those words give short, readable ids).

:func:`clip_text_config_kwargs` / :func:`tiny_clip_text_config` give a matching small ``CLIPTextConfig`` whose
special-token ids are the tokenizer's. That matters: ``CLIPTextModel`` pools the hidden state at the EOS token,
and which position it takes depends on the config's ``eos_token_id`` (see :func:`clip_text_config_kwargs`).

In transformers 5 ``CLIPTokenizer`` is backed by the ``tokenizers`` library (there is no pure-Python CLIP
tokenizer any more) and ``CLIPTokenizerFast`` is the same class; both load the folders written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from distill.errors import DistillError

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds and most of distill never needs it
    from transformers import CLIPTextConfig, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's BPE marks the last symbol of every word with this suffix, so "red" alone and "red" inside "redo" differ.
END_OF_WORD = "</w>"


def byte_symbols() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for bytes 0..255, in byte order.

    This is GPT-2's / CLIP's ``bytes_to_unicode``: printable Latin-1 bytes stand for themselves, the others are
    shifted to code points from 256 up, so that every byte is a visible, non-whitespace character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return [table[b] for b in range(256)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair (all its occurrences, left to right).

    Same algorithm as CLIP's reference ``bpe`` and, for these merges, as the ``tokenizers`` BPE model;
    :func:`build_clip_tokenizer` checks the result against the real tokenizer anyway.
    """
    word = list(symbols)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def _pre_tokenize(words: Iterable[str]) -> list[str]:
    """Each word as the single byte-level piece CLIP's normalizer and pre-tokenizer make of it; sorted, unique.

    Uses the real tokenizer's normalizer (NFC, whitespace, lowercase) and pre-tokenizer (CLIP's split regex, then
    bytes -> symbols), so a word here is exactly what the tokenizer will later hand to BPE. A "word" that the
    pre-tokenizer splits (``t-shirt``, ``12``, ``it's``) could never come out as one token, so it is an error.
    """
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # vocabulary-free: only its normalizer and pre-tokenizer are used
    assert backend.normalizer is not None and backend.pre_tokenizer is not None
    pieces: set[str] = set()
    bad: list[str] = []
    for word in words:
        normalized = backend.normalizer.normalize_str(word.strip())
        split = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        if len(split) != 1:
            bad.append(repr(word))
        else:
            pieces.add(split[0])
    if bad:
        raise DistillError(
            f"cannot make one CLIP token of {', '.join(bad)}: CLIP's pre-tokenizer splits it (digits, spaces and "
            "punctuation between letters are split off); give letters-only words."
        )
    return sorted(pieces)


def clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which each given word is one token ``word</w>``.

    Vocabulary order follows CLIP's: the 256 byte symbols, their 256 ``</w>`` variants, the merge results in
    merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last, so EOS has the highest id as in CLIP.

    Merges are found by running BPE on each word (in sorted order) with the merges so far and, while the word is
    not one token, appending a merge of its first two symbols. An appended merge has the lowest priority of all,
    so it can never fire inside an earlier word before that word's own merges have made it one token; each
    earlier word therefore still tokenizes to one token, and the output depends only on the set of words.
    """
    symbols = byte_symbols()
    vocab_list = symbols + [s + END_OF_WORD for s in symbols]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(vocab_list)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in _pre_tokenize(words):
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(word := _bpe(word, ranks)) > 1:
            pair = (word[0], word[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            # Two different merges may spell the same token (``ab+c`` and ``a+bc``); it keeps one id.
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(words: Iterable[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP tokenizer whose vocabulary holds ``words`` into ``folder`` and load it from there.

    The folder gets the files of Stable Diffusion's ``tokenizer/`` folder: ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` and ``special_tokens_map.json``. ``CLIPTokenizer.from_pretrained(folder)`` and
    ``CLIPTokenizerFast.from_pretrained(folder)`` load it offline. ``<|endoftext|>`` is also the padding (and
    unknown) token, as in Stable Diffusion's tokenizer; every byte has a token, so unknown words fall back to
    several single-symbol tokens instead of failing. Words are lowercased (CLIP's normalizer lowercases text).

    Returns the loaded ``transformers.CLIPTokenizer``, after checking that each word is exactly one token.
    Raises :class:`DistillError` for a word CLIP's pre-tokenizer would split (``t-shirt``, ``42``).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(words)
    vocab, merges = clip_vocab_and_merges(words)

    # ensure_ascii=False keeps the byte symbols readable; sort_keys=False keeps the file in id order.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    # CLIP's merges.txt starts with a version line that loaders skip.
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    # Check with the real tokenizer rather than trusting _bpe: a word that is not one token would silently give
    # longer prompts, and tests rely on "a red seven" being [bos, a, red, seven, eos].
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"words not one token in the built CLIP tokenizer: {split[:5]}")
    return tokenizer


def clip_text_config_kwargs(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 37,
    projection_dim: int = 32,
    **overrides: Any,
) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` kwargs for a small text encoder that matches ``tokenizer``.

    ``vocab_size`` is the tokenizer's size, ``max_position_embeddings`` its ``model_max_length`` (pipelines pad
    prompts to that length), and the bos/eos/pad ids are the tokenizer's. The eos id matters for pooling: in
    transformers 5.24 ``CLIPTextTransformer`` pools at ``input_ids.argmax(-1)`` when ``eos_token_id == 2``
    (a legacy path for configs written before transformers PR #24773, correct only when EOS is the largest id)
    and otherwise at the first position where ``input_ids == eos_token_id``. CLIPTextConfig's default eos id
    (49407) is not our EOS; with it no position matches, ``argmax`` of an all-false row is 0, and every prompt
    would pool the BOS state. Tokenizers from :func:`build_clip_tokenizer` put EOS last, so both paths agree.
    Other fields keep CLIPTextConfig's defaults (quick_gelu, as in CLIP); ``**overrides`` go in last.
    """
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "projection_dim": projection_dim,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "max_position_embeddings": int(tokenizer.model_max_length),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(overrides)
    return kwargs


def tiny_clip_text_config(tokenizer: CLIPTokenizer, **kwargs: Any) -> CLIPTextConfig:
    """A ``transformers.CLIPTextConfig`` from :func:`clip_text_config_kwargs` (same arguments)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**clip_text_config_kwargs(tokenizer, **kwargs))
