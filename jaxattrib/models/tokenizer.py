"""Offline, pure-Python CLIP BPE tokenizer (what Stable Diffusion pipelines use).

Follows transformers' ``CLIPTokenizer`` (5.x, backed by the ``tokenizers`` library; the same
rules as the old slow tokenizer without ``ftfy``) step by step:

1. added/special tokens (``<|startoftext|>``, ``<|endoftext|>``, the pad token, and any
   ``added_tokens_decoder`` entries of ``tokenizer_config.json``) are matched verbatim in the raw
   text and map straight to their ids. Like transformers, this includes an SD-2 pad token ``!``:
   every ``!`` in a prompt becomes id 0, never BPE's ``!</w>`` or ``!!``;
2. the rest is normalised: Unicode NFC, every run of whitespace -> one space, lowercase;
3. pre-tokenised with CLIP's pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (leftmost alternative wins; whitespace is dropped) — implemented as a small scanner over
   ``unicodedata`` categories so that no ``regex`` dependency is needed;
4. each piece's UTF-8 bytes are mapped to printable characters (GPT-2 ``bytes_to_unicode``);
5. BPE: the piece is split into characters, ``</w>`` is appended to the last one, characters
   missing from the vocabulary become the unknown token (``<|endoftext|>``), and merges are
   applied lowest rank first (ties: leftmost), one at a time, as the ``tokenizers`` BPE model
   does;
6. ``[bos] + ids + [eos]``, truncated to ``max_length`` (content cut to ``max_length - 2``) and
   right-padded with the pad token — the ``padding='max_length', truncation=True`` call of the
   diffusers SD pipelines. SD-1.x pads with ``<|endoftext|>`` (49407); SD-2.x with ``!`` (id 0),
   as read from the folder's ``tokenizer_config.json`` / ``special_tokens_map.json``.

Merges whose operands or result are not in ``vocab.json`` are skipped ([design]): the original
CLIP ``merges.txt`` lists more merges than the vocabulary holds and the slow tokenizer cut them
at 49152 - 256 - 2; skipping out-of-vocabulary merges gives the same result for such files.

:func:`build_word_tokenizer` is ours: it writes a tiny, valid CLIP-format tokenizer folder in
which every listed word is a single token and any other text falls back to byte-level
characters (useful for the embedded tiny demo model, and loadable by transformers as well).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxattrib.models.convert import CheckpointError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from the 256 byte values to printable unicode characters (fixed order)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def normalize(text: str) -> str:
    """NFC, whitespace runs -> single space, lowercase (CLIPTokenizer's normaliser)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for ch in text:
        if ch.isspace():
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch)
            in_space = False
    return "".join(out).lower()


def pre_tokenize(text: str) -> list[str]:
    """Splits normalised text into CLIP pieces (see module docstring, step 3)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith(BOS, i) or text.startswith(EOS, i):
            tok = BOS if text.startswith(BOS, i) else EOS
            pieces.append(tok)
            i += len(tok)
            continue
        if ch == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if c is not None:
                pieces.append(c)
                i += len(c)
                continue
        if _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(ch):
            j = i + 1
        elif ch.isspace():
            i += 1
            continue
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j])
                                 or _is_number(text[j])):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise CheckpointError(f"{path}:{lineno}: expected two symbols separated by a "
                                      f"space, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list[tuple[str, str]], dict[str, int]]:
    """vocab, merges and added tokens of a ``tokenizers`` file (what transformers 5 saves)."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: expected a BPE tokenizer model")
    if model.get("end_of_word_suffix") != SUFFIX:
        raise CheckpointError(f"{path}: end_of_word_suffix={model.get('end_of_word_suffix')!r}; "
                              f"a CLIP tokenizer uses {SUFFIX!r}")
    merges = []
    for m in model.get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise CheckpointError(f"{path}: malformed merge {m!r}")
        merges.append((pair[0], pair[1]))
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []
             if isinstance(t, dict) and "content" in t and "id" in t}
    return model.get("vocab"), merges, added


class CLIPTokenizer:
    """CLIP BPE tokenizer. Build with :meth:`from_folder` (or directly from vocab and merges).

    Args:
      vocab: token -> id (``vocab.json``).
      merges: ordered list of merge pairs (``merges.txt`` without its ``#version`` header).
      model_max_length: default padded length (77 for SD).
      bos_token, eos_token, unk_token, pad_token: special token strings.
      added_tokens: extra token -> id entries matched verbatim in the raw text.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 model_max_length: int = 77, bos_token: str = BOS, eos_token: str = EOS,
                 unk_token: str = EOS, pad_token: str = EOS,
                 added_tokens: dict[str, int] | None = None):
        self.vocab = dict(vocab)
        self.added_tokens = dict(added_tokens or {})
        ranks: dict[tuple[str, str], int] = {}
        for a, b in merges:
            if a in self.vocab and b in self.vocab and a + b in self.vocab and (a, b) not in ranks:
                ranks[(a, b)] = len(ranks)
        self.ranks = ranks
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                          ("unk_token", unk_token), ("pad_token", pad_token)):
            if self._id(tok) is None:
                raise ValueError(f"{name}={tok!r} is not in the vocabulary")
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.unk_token_id = self._id(unk_token)
        self.pad_token_id = self._id(pad_token)
        self._byte_encoder = bytes_to_unicode()
        # Tokens matched verbatim before normalisation, longest first.
        specials = {bos_token, eos_token, unk_token, pad_token} | set(self.added_tokens)
        self._specials = sorted(specials, key=len, reverse=True)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _id(self, token: str) -> int | None:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.vocab.get(token)

    @property
    def vocab_size(self) -> int:
        return len(set(self.vocab.values()) | set(self.added_tokens.values()))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """Reads ``vocab.json`` + ``merges.txt`` (as in SD checkpoints), or else
        ``tokenizer.json`` (what transformers 5 ``save_pretrained`` writes), plus
        ``tokenizer_config.json`` and ``special_tokens_map.json`` when present. No network."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory; expected a tokenizer folder "
                                  f"with vocab.json and merges.txt (or tokenizer.json)")
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        added: dict[str, int] = {}
        if vocab_path.is_file() or merges_path.is_file():
            for p in (vocab_path, merges_path):
                if not p.is_file():
                    raise CheckpointError(f"{p}: missing; a CLIP tokenizer folder needs "
                                          f"vocab.json and merges.txt")
            vocab = _read_json(vocab_path)
            merges = _read_merges_txt(merges_path)
        elif (folder / "tokenizer.json").is_file():
            vocab, merges, added = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise CheckpointError(f"{folder}: no vocab.json + merges.txt or tokenizer.json; "
                                  f"expected a CLIP tokenizer folder")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise CheckpointError(f"{folder}: the vocabulary must map tokens to integer ids")
        kwargs: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            if not path.is_file():
                continue
            cfg = _read_json(path)
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                tok = _token_content(cfg.get(key))
                if isinstance(tok, str):
                    kwargs[key] = tok
            mml = cfg.get("model_max_length")
            if isinstance(mml, (int, float)) and 0 < mml < 1e6:
                kwargs["model_max_length"] = int(mml)
            for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
                content = _token_content(tok)
                if isinstance(content, str):
                    added[content] = int(idx)
        try:
            return cls(vocab, merges, added_tokens=added, **kwargs)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from e

    # ------------------------------------------------------------------ encoding
    def bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised piece (byte-level mapping + BPE, module docstring 4-5)."""
        if piece in self._cache:
            return self._cache[piece]
        chars = [self._byte_encoder[b] for b in piece.encode("utf-8")]
        chars[-1] = chars[-1] + SUFFIX
        symbols: list[str | None] = [c if c in self.vocab else None for c in chars]
        while len(symbols) > 1:
            best, best_i = None, -1
            for i in range(len(symbols) - 1):
                a, b = symbols[i], symbols[i + 1]
                if a is None or b is None:
                    continue
                r = self.ranks.get((a, b))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            symbols[best_i:best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
        ids = tuple(self.unk_token_id if s is None else self.vocab[s] for s in symbols)
        self._cache[piece] = ids
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        parts: list[tuple[str, bool]] = []
        i, start = 0, 0
        while i < len(text):
            tok = next((s for s in self._specials if text.startswith(s, i)), None)
            if tok is None:
                i += 1
                continue
            if start < i:
                parts.append((text[start:i], False))
            parts.append((tok, True))
            i += len(tok)
            start = i
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        ids: list[int] = []
        for part, special in self._split_specials(text):
            if special:
                ids.append(self._id(part))
                continue
            for piece in pre_tokenize(normalize(part)):
                if piece in (BOS, EOS) and self._id(piece) is not None:
                    ids.append(self._id(piece))
                else:
                    ids.extend(self.bpe(piece))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (for inspection)."""
        inv = {v: k for k, v in self.vocab.items()} | {v: k for k, v in self.added_tokens.items()}
        return [inv[i] for i in self.encode(text)]

    def __call__(self, texts: str | Iterable[str], max_length: int | None = None) -> np.ndarray:
        """int32 ids [B, max_length]: ``[bos] + ids[:max_length-2] + [eos]`` then pad tokens.

        ``max_length`` defaults to ``model_max_length`` (77 for SD). A single string gives B=1.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 2:
            raise ValueError(f"max_length={length}: must be at least 2 (bos and eos)")
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[:length - 2] + [self.eos_token_id]
            out[row, :len(ids)] = ids
        return out


# --------------------------------------------------------------------------- building

def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_word_tokenizer(words: Iterable[str], folder: str | os.PathLike, *,
                         pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Writes a tiny CLIP-format tokenizer folder where each of ``words`` is one token.

    The vocabulary is CLIP's layout: the 256 byte characters, the same with ``</w>``, one entry
    per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (so ``!`` is id 0 as in SD-2).
    Each word's merges are built right to left — ``(c_{n-1}, c_n</w>)``, then
    ``(c_{n-2}, c_{n-1}c_n</w>)``, ... — so the only mergeable pair in a piece is always the
    one next to its end-of-word symbol and every listed word reduces to exactly one token
    whatever the other words are; any other text falls back to (partial) byte characters.

    Words are lowercased and must each be one CLIP piece (a run of letters, one digit, or a run
    of punctuation), e.g. ``"cat"``, ``"7"``, ``"sks"``. Also writes ``tokenizer_config.json``
    and ``special_tokens_map.json`` (``pad_token`` ``<|endoftext|>`` as SD-1, or ``!`` as SD-2).
    Returns the folder path. Files are written atomically.
    """
    folder = Path(folder)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + SUFFIX for c in byte_chars]
    known = set(vocab_list)
    merges: list[tuple[str, str]] = []
    seen_words = []
    for word in words:
        w = normalize(word)
        if pre_tokenize(w) != [w] or w in (BOS, EOS):
            raise ValueError(f"word {word!r} is not a single CLIP piece (letters, one digit or "
                             f"punctuation only); it cannot become one token")
        if w in seen_words:
            continue
        seen_words.append(w)
        chars = [bytes_to_unicode()[b] for b in w.encode("utf-8")]
        suffix = chars[-1] + SUFFIX
        for c in reversed(chars[:-1]):
            merged = c + suffix
            if merged not in known:
                merges.append((c, suffix))
                known.add(merged)
                vocab_list.append(merged)
            suffix = merged
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if pad_token not in vocab:
        raise ValueError(f"pad_token={pad_token!r} is not in the vocabulary")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(model_max_length),
        "do_lower_case": True,
        "errors": "replace",
        **specials,
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                            "single_word": False, "special": True} for t in (BOS, EOS)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _atomic_write(folder / "merges.txt",
                  "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    _atomic_write(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    return folder
