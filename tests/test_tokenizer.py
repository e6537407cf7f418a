"""Tests for course_lib.tokenizer (chapter 01), against independent references: hand-computed
cases, GPT-2's split pattern run by the `regex` module, Hugging Face `tokenizers` (BPE training and
encoding) and `sentencepiece` itself."""
import codecs
import contextlib
import random
import sys
from pathlib import Path

import pytest
import regex
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

import course_lib.tokenizer as tokenizer_module
from course_lib.checking import STUB_HINT
from course_lib.checks.tokenizer import check_bpe_encode, check_decode_complete, check_merge_pair
from course_lib.gguf_tokenizer import apply_merges_heap, bpe_word
from course_lib.tokenizer import (BPE, LLAMA2_SPM_OPTIONS, Tokenizer, apply_merges, get_pair_counts, merge_pair,
                                  split_text, train_merges, train_sentencepiece)
from course_lib.validation import trusted_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shortcuts import refused, source_copy  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
CORPUS = DATA / "tinyshakespeare.txt"
TRICKY = ["", " ", "\n", "naïve café, Ångström", "日本語のテキスト", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧",
          "tabs\tand\n\nnewlines  \n   ", "x" * 300, "Ελληνικά русский עברית 1234567890",
          "We'll see: it's done, they've gone_away!!", "e\u0301 combining accent", "\x00\x7f nul and del"]


@pytest.fixture(scope="module")
def text() -> str:
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(text) -> BPE:
    return BPE.train(text, vocab_size=1000)


# ---------------------------------------------------------------- get_pair_counts, merge_pair

def test_get_pair_counts_hand_computed():
    assert get_pair_counts([]) == {}
    assert get_pair_counts([5]) == {}
    assert get_pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_pair_counts([1, 1, 1]) == {(1, 1): 2}  # overlapping pairs both count
    counts = {(1, 2): 10}
    out = get_pair_counts([1, 2, 2], counts)
    assert out is counts and counts == {(1, 2): 11, (2, 2): 1}


@pytest.mark.parametrize("ids, pair, expected", [
    ([], (1, 2), []),
    ([7], (7, 7), [7]),
    ([1, 2, 3, 1, 2], (1, 2), [99, 3, 99]),
    ([5, 6, 1, 2], (1, 2), [5, 6, 99]),  # pair at the end
    ([1, 2, 5, 6], (1, 2), [99, 5, 6]),  # pair at the start
    ([2, 1, 3], (1, 2), [2, 1, 3]),  # no occurrence (reversed pair)
    ([1, 1, 1], (1, 1), [99, 1]),  # left to right, non-overlapping
    ([1, 1, 1, 1], (1, 1), [99, 99]),
    ([1, 1, 1, 1, 1], (1, 1), [99, 99, 1]),
])
def test_merge_pair_hand_computed(ids, pair, expected):
    given = list(ids)
    assert merge_pair(given, pair, 99) == expected
    assert given == ids  # input untouched


def test_merge_pair_matches_str_replace():
    # str.replace also replaces non-overlapping occurrences left to right: an independent reference
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(3) for _ in range(rng.randrange(12))]
        a, b = rng.randrange(3), rng.randrange(3)
        expected = "".join("abc"[i] for i in ids).replace("abc"[a] + "abc"[b], "Z")
        assert "".join("abcZ"[i] for i in merge_pair(ids, (a, b), 3)) == expected


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_merge_pair_bad_pair(context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(ValueError, match="pair"):
            merge_pair([1, 2], (1, 2, 3), 9)


# ---------------------------------------------------------------- split_text

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def test_split_text_matches_gpt2_pattern(text):
    for s in [text[:20000], *TRICKY]:
        assert split_text(s) == regex.findall(GPT2_PATTERN, s), s
        assert "".join(split_text(s)) == s


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_split_text_type_error(context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(TypeError, match="text"):
            split_text(b"bytes")


# ---------------------------------------------------------------- BPE training and encoding

def test_train_hand_checkable():
    # chunks: "ab", " ab", " ab", " bc"; (a, b) occurs 3 times -> 256; then (" ", 256) twice -> 257;
    # then (" ", b) and (b, c) once each: the tie goes to the smaller pair (32, 98) -> 258; then
    # (258, c) -> 259; after that every chunk is one token, so training stops early
    bpe = BPE.train("ab ab ab bc", vocab_size=300)
    assert bpe.merges == {(97, 98): 256, (32, 256): 257, (32, 98): 258, (258, 99): 259}
    assert list(bpe.merges.values()) == [256, 257, 258, 259]  # learned order
    assert bpe.vocab[257] == b" ab" and bpe.vocab[259] == b" bc"
    assert bpe.vocab_size == 260
    assert bpe.encode("ab ab bc") == [256, 257, 259]


def test_encode_uses_merge_priority():
    # chunks "bc" x3 and "ab" x2 (newlines are separate chunks): (b, c) -> 256 first, then (a, b) -> 257
    bpe = BPE.train("bc\nbc\nbc\nab\nab", vocab_size=300)
    assert bpe.merges == {(98, 99): 256, (97, 98): 257}
    # in "abc" the pair (a, b) comes first in the text, but (b, c) was learned first
    assert bpe.encode("abc") == [97, 256]
    assert bpe.encode("ab") == [257]
    assert BPE({(98, 99): 256, (97, 98): 257}).encode("abcab") == [97, 256, 257]


def test_vocab_size_256_means_bytes(text):
    bpe = BPE.train(text[:1000], vocab_size=256)
    assert bpe.merges == {} and bpe.encode("héllo") == list("héllo".encode("utf-8"))


def test_same_vocabulary_as_hf_bpe_trainer(text, bpe):
    # Hugging Face tokenizers learns the same 1000 tokens (it orders tied pairs differently)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    char_to_byte = _gpt2_char_to_byte()
    assert {bytes(char_to_byte[c] for c in piece) for piece in hf.get_vocab()} == set(bpe.vocab.values())


def test_encode_matches_hf_bpe_with_our_merges(text, bpe):
    byte_to_char = {b: c for c, b in _gpt2_char_to_byte().items()}
    as_chars = lambda token: "".join(byte_to_char[b] for b in token)
    hf = HFTokenizer(models.BPE({as_chars(t): i for i, t in bpe.vocab.items()},
                                [(as_chars(bpe.vocab[a]), as_chars(bpe.vocab[b])) for a, b in bpe.merges]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ids = bpe.encode(text)
    assert hf.encode(text).ids == ids
    for s in TRICKY:
        assert hf.encode(s).ids == bpe.encode(s), s
    assert len(text.encode("utf-8")) / len(ids) > 2.3  # it compresses


def _gpt2_char_to_byte() -> dict[str, int]:
    "GPT-2's bytes_to_unicode, inverted."
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


def test_round_trip(text, bpe):
    assert bpe.decode(bpe.encode(text)) == text
    for s in TRICKY:
        assert bpe.decode(bpe.encode(s)) == s, s
    rng = random.Random(0)
    for _ in range(100):  # random code points, surrogates excluded
        s = "".join(chr(rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0xD800),
                                    rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(20)))
        assert bpe.decode(bpe.encode(s)) == s


def test_decode_invalid_utf8_replaces(bpe):
    assert bpe.decode([0xC3]) == "\ufffd"
    assert bpe.decode([]) == ""


def test_train_merges_weights_by_chunk_count():
    # (b, c) appears once but in a chunk counted 5 times; (a, b) in two chunks counted once each
    merges = train_merges({b"bc": 5, b"ab": 1, b"xab": 1}, 1)
    assert merges == {(98, 99): 256}
    assert apply_merges([97, 98, 99], {(98, 99): 256, (97, 98): 257}) == [97, 256]


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_bpe_bad_input(bpe, context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(TypeError, match="text"):
            bpe.encode(b"bytes")
        with pytest.raises(TypeError, match="text"):
            BPE.train(None, 300)
        with pytest.raises(TypeError, match="vocab_size"):
            BPE.train("abc", 300.0)
        with pytest.raises(ValueError, match="vocab_size.*100"):
            BPE.train("abc", 100)
        with pytest.raises(ValueError, match="5000"):
            bpe.decode([104, 5000])
        with pytest.raises(ValueError, match="-1"):
            bpe.decode([-1])
        with pytest.raises(TypeError, match="ids"):
            bpe.decode([1.5])
        with pytest.raises(ValueError, match="text"):
            bpe.encode("lone surrogate \ud800")
        with pytest.raises(ValueError, match="257"):
            BPE({(97, 98): 257})
        with pytest.raises(ValueError, match="not defined"):
            BPE({(97, 300): 256})


# ---------------------------------------------------------------- SentencePiece and Tokenizer

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "shakespeare", vocab_size=500)


def test_llama2_options():
    assert LLAMA2_SPM_OPTIONS["model_type"] == "bpe" and LLAMA2_SPM_OPTIONS["byte_fallback"] is True
    assert (LLAMA2_SPM_OPTIONS["unk_id"], LLAMA2_SPM_OPTIONS["bos_id"], LLAMA2_SPM_OPTIONS["eos_id"],
            LLAMA2_SPM_OPTIONS["pad_id"]) == (0, 1, 2, -1)


def test_train_sentencepiece_layout_and_determinism(sp_model, tmp_path):
    assert sp_model.name == "shakespeare.model" and sp_model.is_file()
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert sp.vocab_size() == 500
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    again = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(CORPUS, tmp_path / "again", 500)))
    pieces = lambda p: [(p.id_to_piece(i), p.get_score(i)) for i in range(p.get_piece_size())]
    assert pieces(sp) == pieces(again)


def test_train_sentencepiece_settings_take_effect(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for s in ["ｆｕｌｌｗｉｄｔｈ ﬁ", "a   b\t\tc  ", "  two leading spaces", "日本 🙂"]:
        assert sp.decode(sp.encode(s)) == s  # identity normalization, spaces kept, byte fallback
    assert sp.encode("Hello", out_type=str)[0].startswith("▁")  # add_dummy_prefix
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("".join(f"in {1600 + i % 7} there were {i % 13 * 11} ducats\n" for i in range(2000)))
    split = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(numbers, tmp_path / "split", 300)))
    joined = spm.SentencePieceProcessor(model_file=str(
        train_sentencepiece(numbers, tmp_path / "joined", 300, split_digits=False)))
    n_digits = lambda p: max(sum(ch.isdigit() for ch in p.id_to_piece(i))
                             for i in range(p.get_piece_size()) if not (p.is_byte(i) or p.is_control(i)))
    assert n_digits(split) == 1 and n_digits(joined) > 1
    assert split.encode("1600", out_type=str) == ["▁", "1", "6", "0", "0"]


def test_train_sentencepiece_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="input_path"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "m", 500)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_sentencepiece(CORPUS, tmp_path / "m", 100)
    with pytest.raises(TypeError, match="vocab_size"):
        train_sentencepiece(CORPUS, tmp_path / "m", "500")


SAMPLES = ["To be, or not to be: that is the question.", "", " ", "\n\nKING RICHARD III:\n",
           " leading and trailing spaces  ", "numbers 3.14159 and 2024", "naïve café 日本語 🙂👍🏽",
           "tabs\tand\r\nCRLF", "<s> is not the bos token </s>", "x" * 500]


def test_tokenizer_matches_sentencepiece(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer(sp_model)
    assert (tok.vocab_size, tok.n_words) == (sp.vocab_size(), sp.vocab_size())
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, -1)
    for s in SAMPLES:
        ids = sp.encode(s)
        assert tok.encode(s, bos=False) == ids
        assert tok.encode(s) == [1, *ids]  # bos=True, eos=False by default
        assert tok.encode(s, bos=True, eos=True) == [1, *ids, 2]
        assert tok.encode(s, bos=False, eos=True) == [*ids, 2]
        assert tok.decode(tok.encode(s, eos=True)) == sp.decode(ids)
    assert Tokenizer(str(sp_model)).encode("abc") == tok.encode("abc")  # str path too


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_tokenizer_bad_input(sp_model, tmp_path, context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(FileNotFoundError, match="missing.model"):
            Tokenizer(tmp_path / "missing.model")
        bad = tmp_path / "bad.model"
        bad.write_bytes(b"this is not a sentencepiece model")
        with pytest.raises(ValueError, match="not a SentencePiece model"):
            Tokenizer(bad)
        tok = Tokenizer(sp_model)
        with pytest.raises(ValueError, match="500"):
            tok.decode([1, 500])
        with pytest.raises(ValueError, match="-1"):
            tok.decode([-1])
        with pytest.raises(TypeError, match="text"):
            tok.encode(["not", "a", "str"])
        with pytest.raises(TypeError, match="ids"):
            tok.decode([1.0])


# ---------------------------------------------------------------- exercise checkers
# the checkers switch the library's own merge_pair and apply_merges off while a candidate runs: the right
# and wrong versions below build on retyped copies of them, as a student's would
own_merge_pair, own_apply_merges = source_copy(tokenizer_module, "merge_pair", "apply_merges")


def _merge_off_by_one(ids, pair, new_id):  # stops one early: drops an unmatched last id
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_overlapping(ids, pair, new_id):  # advances by 1 after a match
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        else:
            out.append(ids[i])
        i += 1
    return out


def _merge_in_place(ids, pair, new_id):  # right answer, but destroys its input
    i = 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            ids[i:i + 2] = [new_id]
        i += 1
    return ids


def _merge_tuple(ids, pair, new_id):
    return tuple(own_merge_pair(ids, pair, new_id))


def test_check_merge_pair_passes_a_copy_of_the_reference():
    result = check_merge_pair(own_merge_pair)
    assert result and result.passed and "passed all" in str(result)


@pytest.mark.parametrize("wrong, message", [
    (_merge_off_by_one, "no occurrence"),
    (_merge_overlapping, "overlapping"),
    (_merge_in_place, "changed its input"),
    (_merge_tuple, "should be a list, got tuple"),
])
def test_check_merge_pair_catches_wrong_versions(wrong, message):
    result = check_merge_pair(wrong)
    assert not result
    assert message in str(result)


def test_check_merge_pair_not_implemented():
    def stub(ids, pair, new_id):
        raise NotImplementedError("todo")
    result = check_merge_pair(stub)
    assert not result and len(result.failures) == 1
    assert "raised NotImplementedError, so the other 9 cases were not run" in str(result)
    assert STUB_HINT in str(result)


def _encode_reference(text, merges):
    return own_apply_merges(list(text.encode("utf-8")), merges)


def _encode_sequential(text, merges):  # also right: replay the merges in order of their new ids
    ids = list(text.encode("utf-8"))
    for pair, new_id in sorted(merges.items(), key=lambda kv: kv[1]):
        ids = merge_pair(ids, pair, new_id)  # the library's merge_pair: a building block encode may use
    return ids


def _encode_leftmost(text, merges):  # merges the leftmost mergeable pair first
    ids = list(text.encode("utf-8"))
    i = 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) in merges:
            ids[i:i + 2] = [merges[ids[i], ids[i + 1]]]
            i = max(i - 1, 0)
        else:
            i += 1
    return ids


def _encode_ord(text, merges):  # code points instead of UTF-8 bytes
    return _encode_sequential_from(list(map(ord, text)), merges)


def _encode_dict_order(text, merges):  # trusts the dict's insertion order
    return _encode_sequential_from(list(text.encode("utf-8")), merges, sort=False)


def _encode_one_pass(text, merges):  # a single scan: misses merges that build on merges
    ids = list(text.encode("utf-8"))
    for pair, new_id in sorted(merges.items(), key=lambda kv: kv[1]):
        ids = own_merge_pair(ids, pair, new_id)
        break
    return ids


def _encode_sequential_from(ids, merges, sort=True):
    items = sorted(merges.items(), key=lambda kv: kv[1]) if sort else merges.items()
    for pair, new_id in items:
        ids = own_merge_pair(ids, pair, new_id)
    return ids


@pytest.mark.parametrize("right", [_encode_reference, _encode_sequential])
def test_check_bpe_encode_passes_right_versions(right):
    result = check_bpe_encode(right)
    assert result, str(result)


@pytest.mark.parametrize("wrong, message", [
    (_encode_leftmost, "priority"),
    (_encode_ord, "non-ASCII"),
    (_encode_dict_order, "not from its position in the dict"),
    (_encode_one_pass, "builds on a merge"),
])
def test_check_bpe_encode_catches_wrong_versions(wrong, message):
    result = check_bpe_encode(wrong)
    assert not result
    assert message in str(result)


def test_checkers_reject_non_callables():
    with pytest.raises(TypeError):
        check_merge_pair("not a function")
    with pytest.raises(TypeError):
        check_bpe_encode(None)


def test_checkers_refuse_the_library_answers():
    "Issue 16: the library's merge_pair and apply_merges passed their own checkers."
    assert refused(check_merge_pair(merge_pair), "the candidate is course_lib.tokenizer.merge_pair itself")
    assert refused(check_merge_pair(lambda ids, pair, new_id: merge_pair(ids, pair, new_id)),
                   "course_lib.tokenizer.merge_pair")
    # an encoder given the single merge {pair: new_id} merges that pair: a loophole for merge_pair
    assert refused(check_merge_pair(lambda ids, pair, new_id: apply_merges(list(ids), {pair: new_id})),
                   "course_lib.tokenizer.apply_merges")
    assert refused(check_bpe_encode(lambda text, merges: apply_merges(list(text.encode("utf-8")), merges)),
                   "course_lib.tokenizer.apply_merges")
    assert refused(check_bpe_encode(lambda text, merges: BPE(merges).encode(text)), "course_lib.tokenizer.BPE")
    # chapter 07b's heap encoder takes the same arguments as apply_merges
    assert refused(check_bpe_encode(lambda text, merges: apply_merges_heap(list(text.encode("utf-8")), merges)),
                   "course_lib.gguf_tokenizer.apply_merges_heap")

    def via_gpt2_merger(text, merges):  # 07b's string-level merger, called along the way
        bpe_word("ab", {})
        return _encode_reference(text, merges)
    assert refused(check_bpe_encode(via_gpt2_merger), "course_lib.gguf_tokenizer.bpe_word")

    def caught(text, merges):  # catching the refusal does not help
        try:
            return apply_merges(list(text.encode("utf-8")), merges)
        except RuntimeError:
            return _encode_reference(text, merges)
    assert refused(check_bpe_encode(caught), "course_lib.tokenizer.apply_merges")


# ---------------------------------------------------------------- Exercise 3: decode_complete

def _decode_by_lead_byte(data):  # right: find the last lead byte and compare its length with what is there
    for back in range(1, min(3, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte 10xxxxxx: the last character starts here
            need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            cut = len(data) - back if need > back else len(data)
            return data[:cut].decode("utf-8"), data[cut:]
    return data.decode("utf-8"), b""


def _decode_by_trying(data):  # also right: the longest prefix that decodes, at most 3 bytes short
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    raise ValueError("not a prefix of UTF-8")


def _decode_replace(data):  # decodes the unfinished character as well
    return data.decode("utf-8", errors="replace"), b""


def _decode_holds_non_ascii(data):  # holds back any non-ASCII tail, complete or not
    cut = len(data)
    while cut and data[cut - 1] >= 0x80:
        cut -= 1
    return data[:cut].decode("utf-8"), data[cut:]


def _decode_last_byte_only(data):  # looks at the last byte only: misses a 3- or 4-byte character cut later
    if data and data[-1] >= 0xC0:
        return data[:-1].decode("utf-8"), data[-1:]
    return data.decode("utf-8", errors="replace"), b""


def _decode_list(data):
    return list(_decode_by_lead_byte(data))


@pytest.mark.parametrize("right", [_decode_by_lead_byte, _decode_by_trying])
def test_check_decode_complete_passes_right_versions(right):
    result = check_decode_complete(right)
    assert result, str(result)


@pytest.mark.parametrize("wrong, message", [
    (_decode_replace, "hold its bytes back instead"),
    (_decode_holds_non_ascii, "complete 2-, 3- and 4-byte characters"),
    (_decode_last_byte_only, "cut after 1 and after 2 of its 3 bytes"),
    (_decode_list, "should return a pair (text, rest), got list"),
])
def test_check_decode_complete_catches_wrong_versions(wrong, message):
    result = check_decode_complete(wrong)
    assert not result and message in str(result), str(result)


def test_check_decode_complete_refuses_the_incremental_decoders():
    def incremental(data):
        text = codecs.getincrementaldecoder("utf-8")().decode(data)
        return text, data[len(text.encode("utf-8")):]
    assert refused(check_decode_complete(incremental), "codecs.getincrementaldecoder")

    def low_level(data):  # final=False holds the unfinished character back
        text, used = codecs.utf_8_decode(data, "strict", False)
        return text, data[used:]
    assert refused(check_decode_complete(low_level), "utf_8_decode")

    def by_lookup(data):  # the decoder class itself, found through the codec registry
        text = codecs.lookup("utf-8").incrementaldecoder().decode(data)
        return text, data[len(text.encode("utf-8")):]
    assert refused(check_decode_complete(by_lookup), "BufferedIncrementalDecoder")
