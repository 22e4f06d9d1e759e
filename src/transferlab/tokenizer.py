"""GPT-2's byte-level BPE tokenizer, written out by hand.

Text becomes token ids in four steps, each a small function below:

    1. split the text at the special token <|endoftext|>      (GPT2Tokenizer.encode)
    2. cut each piece into words with GPT-2's regex           (pretokenize)
    3. write each word's UTF-8 bytes as printable characters  (bytes_to_unicode)
    4. merge adjacent symbols by rank until none applies      (bpe)

and the ids become text again by joining the token strings, mapping each character back
to its byte and decoding UTF-8 (GPT2Tokenizer.decode).

The vocabulary comes from a Hugging Face GPT-2 folder (vocab.json, merges.txt) or from
OpenAI's own files (encoder.json, vocab.bpe: the same content under other names).
Docs: docs/tokenization.md.
"""
from __future__ import annotations

import json
import operator
import os
from functools import lru_cache

import regex

EOT = "<|endoftext|>"  # GPT-2's only special token: the end of a document

# GPT-2's pre-tokenisation pattern. The alternatives are tried left to right at each
# position; docs/tokenization.md#the-pre-tokeniser walks through what each one catches.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d"""  # English contractions (lower case only, as GPT-2)
    r"""| ?\p{L}+"""                 # a run of letters, with at most one leading space
    r"""| ?\p{N}+"""                 # a run of digits
    r"""| ?[^\s\p{L}\p{N}]+"""       # a run of anything else that is not whitespace
    r"""|\s+(?!\S)"""                # whitespace, leaving its last space for the next word
    r"""|\s+"""                      # whitespace at the very end of the text
)

# The per-word cache is cleared when it holds this many words, so encoding an endless
# stream of distinct words cannot grow memory without bound.
CACHE_LIMIT = 100_000


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> character map: every one of the 256 bytes gets one printable character.

    BPE works on strings, and the vocabulary files are text, so each byte needs a
    character that prints and survives a JSON file. The 188 bytes that are already
    printable (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves; the other 68 (control
    bytes, the space, DEL, 0x80-0xA0 and the soft hyphen 0xAD) map, in byte order, to
    chr(256), chr(257), ...: that is why a leading space shows up as `Ġ` (chr(288)).
    See docs/tokenization.md#the-byte-to-unicode-map.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def pretokenize(text: str) -> list[str]:
    """Cut text into the words BPE works on, with GPT-2's pattern (GPT2_PATTERN).

    BPE never merges across two words, so a token can never span "dog." or " the cat".
    The words concatenate back to the text exactly: the pattern matches every character.
    See docs/tokenization.md#the-pre-tokeniser.
    """
    return GPT2_PATTERN.findall(text)


def bpe(symbols, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols, lowest-ranked pair first, until no pair has a rank.

    symbols: the word as a sequence of strings (its byte characters);
    ranks: (left, right) -> rank, the line number of that merge in merges.txt.
    Each step finds the adjacent pair with the lowest rank anywhere in the word and merges
    *every* occurrence of it, left to right (so "a a a" under the merge "a a" gives
    "aa a"). The rank, not the position, decides which merge happens first: this replays
    the order in which the merges were learnt. See docs/tokenization.md#bpe-merges-by-rank.
    """
    word = list(symbols)
    while len(word) > 1:
        pairs = zip(word, word[1:])
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break  # no adjacent pair was ever merged during training: done
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2  # both symbols are used: occurrences never overlap
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def encode_around_eot(text: str, eot_id: int, encode_piece) -> list[int]:
    """Cut `text` at each `<|endoftext|>`, encode every piece with encode_piece(piece) ->
    ids, and put eot_id between them: the special token never merges with its neighbours.
    Shared by GPT2Tokenizer and data.ByteVocab."""
    if not isinstance(text, str):
        raise ValueError(f"encode: expected a str, got {type(text).__name__}")
    ids = []
    for k, piece in enumerate(text.split(EOT)):
        if k > 0:
            ids.append(eot_id)
        ids.extend(encode_piece(piece))
    return ids


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: `encode(text) -> ids`, `decode(ids) -> text`.

    encoder: token string -> id (vocab.json), the ids exactly 0 .. len(encoder) - 1, and
             `<|endoftext|>` among the tokens;
    merges:  the (left, right) pairs of merges.txt, most important first.
    See docs/tokenization.md.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        _check_encoder(encoder, "vocab")
        self.encoder = dict(encoder)
        self.decoder = {i: token for token, i in self.encoder.items()}
        ranks = {}
        for rank, pair in enumerate(merges):
            _check_merge(pair, self.encoder, ranks, f"merges[{rank}]")
            ranks[tuple(pair)] = rank
        self.ranks = ranks
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        self.cache: dict[str, list[int]] = {}  # word -> its ids

    # ---------------------------------------------------------------- reading the files

    @classmethod
    def from_files(cls, vocab_json, merges_txt) -> "GPT2Tokenizer":
        """Read vocab.json (or encoder.json) and merges.txt (or vocab.bpe).

        A missing, non-UTF-8 or malformed file raises ValueError naming the file and line.
        """
        vocab_json, merges_txt = os.fspath(vocab_json), os.fspath(merges_txt)
        encoder = _read_vocab(vocab_json)
        _check_encoder(encoder, vocab_json)
        merges, where = _read_merges(merges_txt)
        # check each merge here, where its line number is known; __init__ checks again
        ranks = {}
        for rank, pair in enumerate(merges):
            _check_merge(pair, encoder, ranks, where[rank])
            ranks[pair] = rank
        return cls(encoder, merges)

    @classmethod
    def from_dir(cls, path) -> "GPT2Tokenizer":
        """Read `vocab.json` and `merges.txt` from a Hugging Face GPT-2 folder."""
        path = os.fspath(path)
        return cls.from_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))

    # ---------------------------------------------------------------- the two directions

    @property
    def vocab_size(self) -> int:
        """Number of tokens, 50257 for GPT-2: the row count of the embedding `wte`."""
        return len(self.encoder)

    @property
    def eot_id(self) -> int:
        """The id of `<|endoftext|>` (50256 for GPT-2)."""
        return self.encoder[EOT]

    def encode(self, text: str) -> list[int]:
        """Token ids of text; each `<|endoftext|>` in it becomes the single id eot_id.

        The special token is cut out before pre-tokenisation, so it never merges with its
        neighbours, and the text on either side is encoded as if it stood alone.
        """
        return encode_around_eot(text, self.eot_id,
                                 lambda piece: [i for word in pretokenize(piece) for i in self._encode_word(word)])

    def _encode_word(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word: its UTF-8 bytes as characters, then BPE.

        Text repeats its words, so each word's ids are cached: on English prose most words
        are found in the cache and BPE runs only on the new ones.
        """
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        try:
            data = word.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: a str no UTF-8 text can hold
            raise ValueError(f"encode: the text holds a lone surrogate U+{ord(word[e.start]):04X}, "
                             f"which has no UTF-8 bytes") from None
        symbols = [self.byte_encoder[b] for b in data]
        ids = []
        for token in bpe(symbols, self.ranks):
            if token not in self.encoder:  # only a vocabulary without all 256 bytes
                raise ValueError(f"encode: {token!r} (in the word {word!r}) is not in the vocabulary")
            ids.append(self.encoder[token])
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()
        self.cache[word] = ids
        return ids

    def decode(self, ids) -> str:
        """Text of token ids: join the token strings, map each character back to its byte,
        decode UTF-8.

        A token may end in the middle of a character (an emoji is 4 bytes, often 2 or 3
        tokens), so a slice of ids may not be valid UTF-8: like GPT-2, invalid bytes become
        U+FFFD (errors="replace"). decode(encode(s)) == s for every str s that has UTF-8.
        """
        tokens = []
        for k, i in enumerate(ids):
            try:  # any integer (NumPy's too), but not True, 3.0 or "3"
                token = None if isinstance(i, bool) else self.decoder.get(operator.index(i))
            except TypeError:
                token = None
            if token is None:
                raise ValueError(f"decode: ids[{k}] = {i!r} is not a token id; the vocabulary has "
                                 f"{self.vocab_size} tokens, ids 0 to {self.vocab_size - 1}")
            tokens.append(token)
        data = bytes(self.byte_decoder[char] for char in "".join(tokens))
        return data.decode("utf-8", errors="replace")


# -------------------------------------------------------------------- checks and file parsing


def _check_encoder(encoder, where: str) -> None:
    """The vocabulary is usable: str tokens written in byte characters, ids 0 .. n-1 once
    each, and <|endoftext|> present. Raises ValueError naming `where` and the entry."""
    if not isinstance(encoder, dict):
        raise ValueError(f"{where}: expected a dict token -> id, got {type(encoder).__name__}")
    byte_chars = set(bytes_to_unicode().values())
    seen = {}
    for token, i in encoder.items():
        if not isinstance(token, str) or not token:
            raise ValueError(f"{where}: the token {token!r} is not a non-empty string")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(encoder):
            raise ValueError(f"{where}: the token {token!r} has id {i!r}; the ids of "
                             f"{len(encoder)} tokens must be the integers 0 to {len(encoder) - 1}")
        if i in seen:
            raise ValueError(f"{where}: the tokens {seen[i]!r} and {token!r} share the id {i}")
        seen[i] = token
        stray = next((c for c in token if c not in byte_chars), None)
        if stray is not None:
            raise ValueError(f"{where}: the token {token!r} (id {i}) holds {stray!r}, which is "
                             f"not one of the 256 byte characters of bytes_to_unicode()")
    if EOT not in encoder:
        raise ValueError(f"{where}: the special token {EOT!r} is missing")


def _check_merge(pair, encoder, ranks, where: str) -> None:
    """One merge is two tokens of the vocabulary whose concatenation is a token too, and
    appears once. Raises ValueError naming `where` (a file line or merges[i])."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(s, str) and s for s in pair)):
        raise ValueError(f"{where}: a merge is two non-empty strings, got {pair!r}")
    left, right = pair
    for token in (left, right, left + right):
        if token not in encoder:
            raise ValueError(f"{where}: the merge {left!r} + {right!r} needs {token!r}, "
                             f"which is not in the vocabulary")
    if (left, right) in ranks:
        raise ValueError(f"{where}: the merge {left!r} + {right!r} appears twice "
                         f"(first as merge {ranks[(left, right)]})")


def _read_text(path: str) -> str:
    """The file as UTF-8 text; ValueError naming the file (and line) when it cannot be."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission, ...
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at "
                         f"offset {e.start})") from None


def _read_vocab(path: str) -> dict:
    """Parse vocab.json: one JSON object token -> id (a repeated token is an error)."""
    def no_repeats(pairs):
        seen = {}
        for token, i in pairs:
            if token in seen:
                raise ValueError(f"{path}: the token {token!r} appears twice")
            seen[token] = i
        return seen

    try:
        encoder = json.loads(_read_text(path), object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{path} line 1: expected a JSON object token -> id, "
                         f"got a JSON {type(encoder).__name__}")
    return encoder


def _read_merges(path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Parse merges.txt: an optional `#version` first line, then one merge per line, two
    symbols separated by one space. Returns the merges and, for each, "file line n"."""
    merges, where = [], []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")  # a file saved with Windows line ends
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path} line {n}: expected two symbols separated by one space, "
                             f"got {line!r}")
        merges.append((parts[0], parts[1]))
        where.append(f"{path} line {n}")
    return merges, where
