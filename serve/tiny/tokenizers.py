"""Real tokenizers for the tiny models, learned offline from a small prompt-ish word list.

CLIP: byte-level BPE laid out exactly like CLIP's (``vocab.json`` + ``merges.txt``), so any text
tokenizes. T5: a SentencePiece-style Unigram model with T5's special tokens (``<pad>``=0,
``</s>``=1, ``<unk>``=2, sentinels ``<extra_id_N>`` at the end), saved as ``tokenizer.json`` that
``T5TokenizerFast.from_pretrained`` reads without ``sentencepiece`` or a hub download.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# The tokenizers learn their vocabulary from these words (a prompt-ish vocabulary). Any text still
# tokenizes: CLIP's byte-level alphabet is always in the vocabulary; T5 falls back to characters,
# then to <unk> as real T5 does.
_CORPUS = """
a an the of in on at with and or by from to under over near beside behind above
photo photograph painting portrait landscape illustration drawing sketch render
cat dog horse bird fish lion tiger wolf fox owl dragon robot astronaut knight wizard
city street house castle tower bridge lighthouse mountain river lake ocean sea beach
forest tree flower garden field desert island sky cloud sun moon star night dusk dawn
red orange yellow green blue purple pink black white golden silver gray brown
beautiful detailed highly realistic cinematic dramatic soft bright dark vivid colorful
lighting light shadow style art digital oil watercolor anime studio masterpiece quality
high resolution sharp focus blurry low ugly bad deformed noise artifacts
sunset sunrise winter summer autumn spring rain snow fog storm
old young small large giant tiny ancient futuristic modern vintage
standing sitting running flying walking looking wearing holding
""".split()

# At most 486 merges: 256 bytes x 2 (plain, word-final) + 486 + 2 specials <= 1000 tokens. The
# corpus runs out of pairs first (~410 merges), which is fine: the vocabulary is what it learned.
_N_MERGES = 486

# T5's sentinels; real T5 has 100, a handful keeps the embedding table small.
T5_EXTRA_IDS = 8

# Characters T5's vocabulary always holds, so unseen words split into pieces instead of <unk>.
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+*#%=@"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word-final-marked symbols; ties broken by the pair itself (deterministic)."""
    freqs = Counter(words)
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in freqs}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:], strict=False):
                pairs[(a, b)] += freqs[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    return merges


def build_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of the tiny CLIP tokenizer, laid out like CLIP's own."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(_CORPUS, _N_MERGES)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab_list:
        seen.setdefault(tok, len(seen))
    return seen, merges


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs: Any) -> Any:
    """A ``CLIPTokenizer`` over ``build_tokenizer_files()``'s output, CLIP's 77-token window."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    tokenizer.model_max_length = 77
    return tokenizer


def write_clip_files(folder: Any, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """The classic CLIP files, so tokenizer loaders that predate ``tokenizer.json`` work too."""
    import json

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")


def build_t5_vocab() -> list[tuple[str, float]]:
    """T5's Unigram pieces with log-probability scores, in T5's id layout.

    ``<pad>``, ``</s>``, ``<unk>`` first, then word-initial (``▁``) and inner pieces, sentinels
    last in reverse order as T5 has them. Whole corpus words, the CLIP merges' subwords and
    single characters are the pieces; a word is scored above its parts, so known words stay one
    token and unknown ones split into the longest known pieces (Viterbi over the scores).
    """
    pieces: dict[str, float] = {}

    def add(piece: str, score: float) -> None:
        if piece not in pieces:
            pieces[piece] = score

    add("▁", -2.0)
    for word in sorted(set(_CORPUS)):
        add("▁" + word, -4.0)
    for a, b in _learn_merges(_CORPUS, _N_MERGES):
        sub = (a + b).replace("</w>", "")
        add("▁" + sub, -6.0 - len(sub) * 0.01)
        add(sub, -7.0 - len(sub) * 0.01)
    for ch in _T5_CHARS:
        add("▁" + ch, -9.0)
        add(ch, -10.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += list(pieces.items())
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    return vocab


def t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` (``</s>`` appended, pads with ``<pad>``=0) over ``build_t5_vocab()``."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=build_t5_vocab(), extra_ids=T5_EXTRA_IDS, model_max_length=model_max_length)
