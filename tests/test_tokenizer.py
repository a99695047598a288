"""Our offline CLIP tokenizer against transformers' CLIPTokenizer on vocabularies we build."""

import json
from collections import Counter

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from jaxattrib.models import tokenizer as tk  # noqa: E402
from jaxattrib.models.convert import CheckpointError  # noqa: E402

CAPTIONS = [
    "a photo of a cat",
    "A  Photo OF sks Dog, sitting on the beach!!",
    "the dog's toy isn't here; they're gone & we'll see",
    "bobcat 1977 vs. 2024 -- 3.14159 ... ?!",
    "café, naïve, Straße, ÉCOLE, cafe\u0301 (NFD)",
    "東京タワー at night 😀🐈 #sunset @home",
    "tabs\tand\nnewlines\r\n  and   spaces  ",
    "x <|endoftext|> y <|startoftext|>z",
    "",
    "   ",
    "'s 'S 'RE 'll''d cats' o'clock",
    "painting of a dog in the style of van gogh, trending on artstation, 4k, highly detailed",
    " ".join(["a very long caption about cats and dogs"] * 12),  # truncated at 77
]

CORPUS = [
    "a photo of a cat", "a photo of the dog", "the cat sat on the mat", "photos of cats and dogs",
    "a painting of a dog in the style of van gogh", "the photographer photographed the cat",
    "cats and dogs, cats and dogs!", "a sketch of the sea at sunset", "sunset over the sea",
    "a dog's toy", "the style of the painting", "highly detailed painting, trending",
]


def train_bpe(corpus, n_merges):
    """Textbook CLIP-style BPE training (most frequent pair; ties broken by the pair itself)."""
    b2u = tk.bytes_to_unicode()
    words = Counter()
    for text in corpus:
        for piece in tk.pre_tokenize(tk.normalize(text)):
            chars = [b2u[b] for b in piece.encode("utf-8")]
            chars[-1] += "</w>"
            words[tuple(chars)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


def write_bpe_folder(folder, merges, *, pad_token="<|endoftext|>", drop_bytes=()):
    """A CLIP-layout tokenizer folder from merges (``drop_bytes`` makes characters unknown)."""
    chars = [c for b, c in tk.bytes_to_unicode().items() if b not in drop_bytes]
    vocab = {}
    for t in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]:
        vocab.setdefault(t, len(vocab))
    vocab[tk.BOS] = len(vocab)
    vocab[tk.EOS] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": pad_token, "bos_token": tk.BOS,
         "eos_token": tk.EOS, "unk_token": tk.EOS, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def assert_parity(folder, captions=CAPTIONS, max_length=77):
    ours = tk.CLIPTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    expected = np.asarray(ref(captions, padding="max_length", max_length=max_length,
                              truncation=True).input_ids)
    got = ours(captions, max_length=max_length)
    assert got.dtype == np.int32 and got.shape == (len(captions), max_length)
    for caption, e, g in zip(captions, expected, got):
        assert list(g) == list(e), caption
    return ours, ref


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_trained_bpe_parity(tmp_path, pad_token):
    merges = train_bpe(CORPUS, 120)
    assert any(len(a) > 1 and len(b) > 1 for a, b in merges)  # real sub-word merges
    folder = write_bpe_folder(tmp_path / "tok", merges, pad_token=pad_token)
    ours, _ = assert_parity(folder)
    # Sub-word merges are really used: an unseen word splits into multi-character pieces.
    assert ours.tokenize("photographing") == ["photog", "raph", "ing</w>"]
    assert ours.tokenize("dogstyle") == ["d", "og", "style</w>"]
    ids = ours(CAPTIONS)
    assert ids[-1, -1] == ours.eos_token_id  # truncated caption still ends with eos
    pad = ours.pad_token_id
    assert pad == (0 if pad_token == "!" else ours.eos_token_id)
    assert ids[0, 7] == pad and ids[0, 6] == ours.eos_token_id


def test_hand_written_merges_and_unknown_characters(tmp_path):
    # Merges where the order matters (a later merge needs an earlier one), a merge whose result
    # is out of vocabulary (skipped), and characters missing from the vocabulary (-> unk).
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("ca", "t"),
              ("cat", "s</w>"), ("o", "f</w>"), ("d", "o"), ("do", "g</w>"), ("s", "t"),
              ("st", "y"), ("sty", "l"), ("styl", "e</w>"), ("e", "r</w>")]
    folder = write_bpe_folder(tmp_path / "tok", merges, drop_bytes=(ord("z"), 0xC3))
    ours, _ = assert_parity(folder, CAPTIONS + ["the cats the style of the doggy zzz über",
                                                "catcat caterer"], max_length=40)
    assert ours.tokenize("the cats") == ["the</w>", "cats</w>"]
    assert ours.encode("zz") == [ours.unk_token_id] * 2
    # A merge whose result is not in vocab.json (the original CLIP merges.txt has ~213k of
    # them past the vocabulary) is skipped, as the slow tokenizer's truncation did.
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:
        f.write("q u\nqu e</w>\n")
    again = tk.CLIPTokenizer.from_folder(folder)
    np.testing.assert_array_equal(again(CAPTIONS + ["queue"]), ours(CAPTIONS + ["queue"]))
    assert again.tokenize("que") == ["q", "u", "e</w>"]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_build_word_tokenizer(tmp_path, pad_token):
    words = ["a", "photo", "of", "cat", "cats", "at", "bobcat", "sks", "dog", "7", "!!",
             "Café", "東京"]
    folder = tk.build_word_tokenizer(words, tmp_path / "tok", pad_token=pad_token,
                                     model_max_length=16)
    ours, ref = assert_parity(folder, CAPTIONS + ["a photo of sks dog", "bobcat cat at 7",
                                                  "café 東京"], max_length=16)
    assert ref.model_max_length == ours.model_max_length == 16
    assert ours(["x"]).shape == (1, 16)
    for w in words:
        if w == "!!" and pad_token == "!":
            continue  # with pad '!', every '!' is the pad token (transformers does the same)
        assert len(ours.encode(w)) == 1, w
        assert len(ref(w, add_special_tokens=False).input_ids) == 1, w
    # CLIP layout: 512 byte symbols, one entry per merge, then bos/eos; '!' is id 0.
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab[tk.EOS] == len(vocab) - 1
    # Other words fall back to characters (plus suffix merges of listed words).
    assert ours.tokenize("bat") == ["b", "at</w>"]
    with pytest.raises(ValueError, match="single CLIP piece"):
        tk.build_word_tokenizer(["two words"], tmp_path / "bad")


def test_reads_transformers_saved_tokenizer_json(tmp_path):
    """transformers 5 save_pretrained writes tokenizer.json (no vocab.json/merges.txt)."""
    folder = write_bpe_folder(tmp_path / "tok", train_bpe(CORPUS, 80), pad_token="!")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ref.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "vocab.json").exists()
    ours = tk.CLIPTokenizer.from_folder(tmp_path / "saved")
    expected = np.asarray(ref(CAPTIONS, padding="max_length", max_length=77,
                              truncation=True).input_ids)
    np.testing.assert_array_equal(ours(CAPTIONS), expected)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        tk.CLIPTokenizer.from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="vocab.json"):
        tk.CLIPTokenizer.from_folder(tmp_path / "empty")
    folder = tk.build_word_tokenizer(["cat"], tmp_path / "tok")
    (folder / "merges.txt").write_text("#version: 0.2\nc a t\n")
    with pytest.raises(CheckpointError, match=r"merges.txt:2"):
        tk.CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="merges.txt: missing"):
        tk.CLIPTokenizer.from_folder(folder)
