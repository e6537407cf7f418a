"""course_lib.gguf_tokenizer against independent references: transformers' tokenizer for the same GGUF
file (the Rust `tokenizers` BPE, its ByteLevel pre-tokenizer with Oniguruma's Unicode tables, its decoder),
transformers' own Jinja rendering of chat templates, a tiny GGUF file written with gguf.GGUFWriter, plus
bad input, load_gguf/load_smollm2 and the exercise checkers."""
import contextlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # transformers reads local files only
transformers.logging.set_verbosity_error()

import jinja2
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode
from transformers.utils.chat_template_utils import render_jinja_template

import course_lib.gguf_tokenizer as G
from course_lib.checks.gguf_tokenizer import check_bpe_word, check_bytes_to_unicode, check_first_misordered_merge
from course_lib.gguf_tokenizer import (GGUFTokenizer, bpe_word, bytes_to_unicode, load_gguf, load_smollm2,
                                       pretokenize, rank_space_merges, render_chat_template)
from course_lib.model import Transformer
from course_lib.tokenizer import SPLIT_PATTERN, BPE
from course_lib.validation import trusted_inputs
from shortcuts import refused, source_copy
from course_lib.weights import fetch_smollm2, load_gguf_model, read_gguf

SPELL = {b: c for b, c in hf_bytes_to_unicode().items()}  # transformers' copy of GPT-2's table


def spell(s: str) -> str:
    "GPT-2's byte-level spelling of `s`, with transformers' table."
    return s.encode("utf-8").decode("latin-1").translate(SPELL)


@pytest.fixture(scope="module")
def smollm2_path():
    return fetch_smollm2(progress=False)


@pytest.fixture(scope="module")
def gf(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def tok(gf):
    return GGUFTokenizer(gf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


SHAKESPEARE = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
CORPUS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they're done!",
    "accents": "Café, naïve, señor, Müller, Ærøskøbing, façade, crème brûlée, Dvořák, Łódź, ÀÉÎÕÜ",
    "combining": "e\u0301te\u0301, n\u0303, a\u0308\u0304, Z\u0351\u0352a\u0353lgo, \u0301 alone",
    "cjk": "日本語のテキストと中文文本，还有繁體字。東京は今日も晴れです。𠀋𡈽𡌛 (CJK Ext B)",
    "korean": "안녕하세요, 세계! 한국어 텍스트를 토큰화합니다. ᄀᄁ (jamo)",
    "arabic": "مرحبا بالعالم، هذا نص عربي. ١٢٣ والأرقام ٤٥٦ ‏(RLM)‏",
    "hebrew": "שלום עולם",
    "devanagari": "नमस्ते दुनिया, संख्या १२३४ क्षत्रिय",
    "thai": "สวัสดีชาวโลก ๑๒๓",
    "cyrillic greek": "Привет, мир! Γειά σου κόσμε. ΑΒΓ αβγ",
    "emoji": "I ❤️ 🦙 and 👍🏽! 👨‍👩‍👧‍👦 👩🏾‍💻 🇫🇷🇯🇵🇺🇳 🏴󠁧󠁢󠁳󠁣󠁴󠁿 1️⃣ #️⃣ ©️ ☺︎",
    "python": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
              "class A:\n    x: int = 0  # comment\n    def f(self, *args, **kw) -> None: ...\n",
    "tabs": "for (int i = 0; i < n; i++) {\n\tsum += a[i];\t// add\n\t\t}\n",
    "json": '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b\\n"}}',
    "digits": "3.14159265358979, 2.71828; 1,000,000 and 2024-01-31 12:34:56 +0200, 0x1F, 1e10",
    "long number": "1234567890" * 6,
    "numbers other": "x² + y³ = z¹, ½ ¼ ¾, Ⅻ ⅷ, ① ⑳, ٣ ३ ๓ 𝟘𝟙",
    "spaces": "a  b   c    d     e",
    "newlines": "\n\n\n",
    "mixed ws": "x\r\n\r\n\t\t y \u00a0z\u3000w\u2028v\u2029u\x0b\x0c",
    "leading": "   x",
    "trailing": "trailing spaces   ",
    "only spaces": "     ",
    "separators": "a\x1cb\x1ec\x1fd\x1c\x1c!",          # \x1d has no token: see the missing-bytes test
    "specials": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<file_sep><|endoftext|><jupyter_code>",
    "special-like": "<|im_start <|im_end|| <im_end> <|IM_END|> < |im_end| > <|im_end|<|im_end|>>",
    "contractions": "I'M sure you'Ve seen it's, can't, won't, y'all, 'tis, 'S 'LL",
    "punctuation": "!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} ||| \\\\ // ~~~ `` \"",
    "urls": "https://example.com/path?query=1&b=2#frag user@example.org",
    "empty": "",
    "shakespeare": SHAKESPEARE[:5000],
}


# ---------------------------------------------------------------- byte alphabet and pre-tokenizer

def test_bytes_to_unicode_matches_transformers_and_tokenizers():
    table = bytes_to_unicode()
    assert table == hf_bytes_to_unicode()
    assert list(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[32], table[10], table[9], table[0], table[173], table[65]) == ("Ġ", "Ċ", "ĉ", "Ā", "Ń", "A")


@pytest.mark.slow
def test_pretokenize_matches_tokenizers_on_every_code_point():
    "Every code point after a letter, after a digit and after a space: the split is tokenizers' own."
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    for start in range(0, len(cps), 8192):
        text = "".join(f"a{c}1{c} {c}" for c in map(chr, cps[start:start + 8192]))  # L joins a, N joins 1, S not " "
        expected = [offsets for _, offsets in byte_level.pre_tokenize_str(text)]
        got = [m.span() for m in G.gpt2_split_regex().finditer(text)]
        if got != expected:
            i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            pytest.fail(f"first difference near {text[expected[i][0] - 6:expected[i][1] + 6]!r}: "
                        f"got span {got[i]}, tokenizers {expected[i]}")


@pytest.mark.parametrize("name", list(CORPUS))
def test_pretokenize_corpus(name):
    text = CORPUS[name]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert [spell(p) for p in pretokenize(text)] == [p for p, _ in byte_level.pre_tokenize_str(text)]
    assert "".join(pretokenize(text)) == text


def test_chapter01_pattern_is_not_exact():
    "What the exact classes fix: No/Nl numbers, \\x1c-\\x1f, and letters newer than Python's Unicode 14.0."
    import re
    ch01 = re.compile(SPLIT_PATTERN)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in ["x²", "a½", "Ⅻb", "a\x1c\x1cb", "\x1f!", "a\U00031350"]:   # U+31350: CJK Ext H (Unicode 15.0)
        expected = [p for p, _ in byte_level.pre_tokenize_str(text)]
        assert [spell(p) for p in pretokenize(text)] == expected
        assert [spell(p) for p in ch01.findall(text)] != expected


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_pretokenize_and_unicode_class_bad_input(context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(TypeError, match="text should be a str, got bytes"):
            pretokenize(b"abc")
        with pytest.raises(ValueError, match="major should be 'L'.*got 'P'"):
            G.unicode_class("P")


# ---------------------------------------------------------------- encode and decode against transformers

@pytest.mark.parametrize("name", list(CORPUS))
def test_encode_decode_corpus(tok, hf_tok, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert ids == hf_tok.encode(text)                      # the default adds nothing for this file
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_encode_whole_corpus_and_long_text(tok, hf_tok):
    text = "\n".join(CORPUS.values()) + SHAKESPEARE[50_000:60_000]
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False) and tok.decode(ids) == text


def test_encode_many_code_points(tok, hf_tok):
    "Every 7th BMP code point and every 101st astral one, in context; surrogates excluded."
    cps = [cp for cp in range(0x20, 0x10000, 7) if not 0xD800 <= cp < 0xE000] + list(range(0x10000, 0x110000, 101))
    for start in range(0, len(cps), 2000):
        text = "".join(f"a{c}b {c}{c}1" for c in map(chr, cps[start:start + 2000]))
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf_tok.decode(ids)


def test_random_strings(tok, hf_tok):
    rng = random.Random(1)
    pieces = [" ", "   ", "\n", "\n\n", "\t", "1", "234", "'s", "'ll", "<|im_end|>", "<|im_start|>", "a", "é", "日",
              "🙂", "\u200d", "\x04", "\x1d", "\u0301", "\U00040000", "²", "Ġ"]
    for _ in range(1000):
        parts = []
        for _ in range(rng.randrange(0, 25)):
            cp = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000), rng.randrange(0x110000)])
            parts.append(rng.choice(pieces) if rng.random() < 0.4 or 0xD800 <= cp < 0xE000 else chr(cp))
        text = "".join(parts)
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == hf_tok.decode(ids), repr(text)


def test_bytes_without_a_token_are_dropped_like_transformers(tok, hf_tok, gf):
    alphabet = hf_bytes_to_unicode()
    vocab = set(gf.metadata["tokenizer.ggml.tokens"])
    assert tok.missing_bytes == [b for b in range(256) if alphabet[b] not in vocab]
    assert len(tok.missing_bytes) == 21
    for text in [".\x04.", "=\x06=", "(\x13(", "a\x04b", "\x04", "\U00040000", "x\U00050000y", "..\x1d\x1d.."]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), repr(text)
    assert tok.encode(".\x04.") == tok.encode("..")         # the neighbours merge once the byte is gone


def test_decode_invalid_utf8_like_transformers(tok, hf_tok):
    rng = random.Random(2)
    single_bytes = [tok.vocab[c] for c in bytes_to_unicode().values() if c in tok.vocab]
    for _ in range(300):
        ids = [rng.choice(single_bytes) for _ in range(rng.randrange(1, 8))]
        assert tok.decode(ids) == hf_tok.decode(ids), ids
    emoji = tok.encode("🙂👍🏽")
    for n in range(len(emoji) + 1):
        assert tok.decode(emoji[:n]) == hf_tok.decode(emoji[:n])


def test_special_tokens_and_ids(tok, hf_tok):
    hf_special = {t.content: i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
    assert tok.special_tokens == hf_special and len(tok.special_tokens) == 17
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.vocab_size == tok.n_words == len(hf_tok) == 49152
    assert tok.encode("<|im_start|><|im_end|>") == [1, 2]
    for text in (CORPUS["specials"], CORPUS["special-like"], "a<|im_end|>b<|endoftext|>"):
        plain = tok.encode(text, split_special_tokens=True)
        assert plain == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert not set(plain) & set(tok.special_tokens.values()) and tok.decode(plain) == text
    assert tok.encode("Hi", bos=True, eos=True) == [1, *hf_tok.encode("Hi"), 2]
    assert tok.token_bytes(tok.vocab["Ġthe"]) == b" the" and tok.token_bytes(2) == b"<|im_end|>"
    assert "GGUFTokenizer(vocab_size=49152" in repr(tok)


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == "Hello world"
    assert tok.decode([torch.tensor(i) for i in ids]) == "Hello world"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_bad_input(tok, context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        for bad in (42, None, b"text", ["a"]):
            with pytest.raises(TypeError, match=f"text should be a str, got {type(bad).__name__}"):
                tok.encode(bad)
        with pytest.raises(ValueError, match="not valid Unicode"):
            tok.encode("a\ud800b")
        with pytest.raises(ValueError, match="ids contains 49152, which is not a token id"):
            tok.decode([5, 49152])
        with pytest.raises(ValueError, match="ids contains -1"):
            tok.decode([-1])
        with pytest.raises(TypeError, match="ids should hold ints, got 1.0"):
            tok.decode([1.0])
        with pytest.raises(TypeError, match="ids should hold ints, got 'a'"):
            tok.decode(["a"])
        with pytest.raises(TypeError, match="ids should be a list of ints, got str"):
            tok.decode("abc")
        with pytest.raises(TypeError, match="got int"):
            tok.decode(5)
        with pytest.raises(ValueError, match="ids contains 99999"):
            tok.token_bytes(99999)


# ---------------------------------------------------------------- BPE pieces

def test_bpe_word_matches_tokenizers_bpe_model(tok, hf_tok, gf):
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(gf.metadata["tokenizer.ggml.merges"])}
    model = hf_tok.backend_tokenizer.model
    chunks = {c for text in CORPUS.values() for c in pretokenize(text)} - {""}
    for chunk in sorted(chunks):
        word = "".join(c for c in spell(chunk) if c in tok.vocab)     # bytes without a token are dropped
        if word:
            assert bpe_word(word, ranks) == [t.value for t in model.tokenize(word)], chunk


def test_smollm2_merges_are_well_ordered(gf):
    "Every merge comes after the merges that make its parts: then GPT-2's rule (merge every occurrence of the"
    "lowest-rank pair) and tokenizers' priority queue (one occurrence at a time) give the same tokens."
    made_at = {}
    for r, m in enumerate(gf.metadata["tokenizer.ggml.merges"]):
        left, right = m.split(" ")
        assert all(made_at.get(part, -1) < r for part in (left, right)), m
        made_at[left + right] = r


def test_rank_space_merges_small():
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "ab", "abc", "bc"])}
    merges, to_vocab = rank_space_merges(["a b", "ab c", "b c"], vocab)
    a, b, c = ord("a"), ord("b"), ord("c")
    assert merges == {(a, b): 256, (256, c): 257, (b, c): 258}
    assert to_vocab[256:] == [3, 4, 5] and to_vocab[a] == 0 and to_vocab[ord("z")] is None
    with pytest.raises(ValueError, match=r"merges\[0\] should be two tokens separated by one space, got 'abc'"):
        rank_space_merges(["abc"], vocab)
    with pytest.raises(ValueError, match=r"merges\[0\] = 'c a' makes 'ca', which is not in the vocabulary"):
        rank_space_merges(["c a"], vocab)
    with pytest.raises(ValueError, match="which an earlier merge already makes"):
        rank_space_merges(["a b", "a b"], vocab)


@pytest.mark.parametrize("context", [contextlib.nullcontext, trusted_inputs], ids=["direct", "trusted"])
def test_bpe_word_bad_input(context):
    with context():  # an entry point checks its arguments, inside trusted_inputs() too
        with pytest.raises(TypeError, match="word should be a str, got list"):
            bpe_word(["a"], {})
        with pytest.raises(TypeError, match="ranks should be a dict"):
            bpe_word("ab", [("a", "b")])


# ---------------------------------------------------------------- chat templates

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Write  code:\n\tx = 1\n"}],
    "system+assistant": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}],
    "unicode+special": [{"role": "system", "content": "Réponds en français 🇫🇷"},
                        {"role": "user", "content": "Qu'est-ce que <|im_end|> ?", "name": None}],
    "empty content": [{"role": "user", "content": ""}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_apply_chat_template_matches_transformers(tok, hf_tok, name, gen):
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.encode(text) == hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n") == gen


TEMPLATES = {
    "llama2-like": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                    "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                    "{% set system = false %}{% endif %}\n"
                    "{% for message in loop_messages %}\n"
                    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}\n"
                    "    {% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
                    "{% endif %}\n"
                    "{% endfor %}"),
    "generation tag, loop controls, tojson, namespace": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m['role'] }}={{ m | tojson }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}"
        "{% if ns.n >= 3 %}{% break %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}{{ tools is none }}{{ documents is none }}"),
    "whitespace control": "{% for m in messages %}\n  {{- m['content'] }}\n  {% if not loop.last %}|{% endif %}\n{% endfor %}\n",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("gen", [False, True])
def test_render_chat_template_matches_transformers(name, gen):
    messages = CONVERSATIONS["multi-turn"] + [{"role": "assistant", "content": "Sure: `x = 1` <é> \"q\""}]
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=TEMPLATES[name],
                                        add_generation_prompt=gen, **specials)
    assert render_chat_template(TEMPLATES[name], messages, add_generation_prompt=gen, **specials) == rendered[0]


def test_chat_template_raise_exception_and_sandbox(tok):
    bad_order = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        render_chat_template(TEMPLATES["llama2-like"], bad_order, bos_token="<s>", eos_token="</s>")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", CONVERSATIONS["user"])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.append(1) }}", CONVERSATIONS["user"])   # immutable sandbox


def test_chat_template_bad_messages(tok):
    with pytest.raises(ValueError, match="messages is empty"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="messages should be a list of dicts.*got str"):
        tok.apply_chat_template("hello")
    with pytest.raises(TypeError, match="messages should be a list of dicts.*got dict"):
        tok.apply_chat_template({"role": "user", "content": "hi"})
    with pytest.raises(TypeError, match=r"messages\[0\] should be a dict with 'role' and 'content', got tuple"):
        tok.apply_chat_template([("user", "hi")])
    with pytest.raises(ValueError, match=r"messages\[1\] has no 'content' \(keys: \['role'\]\)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'role'"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'content'"):
        tok.apply_chat_template([{"role": "user", "content": None}])    # None values are dropped, as transformers does
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] should be a str, got int"):
        tok.apply_chat_template([{"role": "user", "content": 5}])
    with pytest.raises(TypeError, match="template should be a str, got NoneType"):
        render_chat_template(None, CONVERSATIONS["user"])


# ---------------------------------------------------------------- a tiny GGUF file with its own vocabulary

TINY_TEXT = ("the cat sat on the mat; the rat ate the hat, then the cat ate the rat! naïve café 日本 🙂 "
             "1234 5678   spaces\n\n  and 'll 's ") * 5


def write_tiny_gguf(path, model="gpt2", pre="smollm", with_tensors=True):
    "A llama GGUF with random F32 weights and a byte-level BPE vocabulary trained by chapter 01's BPE."
    alphabet = bytes_to_unicode()
    bpe = BPE.train(TINY_TEXT, 300)
    spelled = lambda i: "".join(alphabet[b] for b in bpe.vocab[i])
    dropped = {0x04, 0x7F}                                       # two bytes without a token, like SmolLM2's 21
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜sep｜>"]    # the last is not in the byte alphabet
    tokens = specials + ["<think>"] + [alphabet[b] for b in range(256) if b not in dropped]
    tokens += [spelled(i) for i in range(256, bpe.vocab_size)]
    types = [3, 3, 3, 3, 4] + [1] * (len(tokens) - 5)
    merges = [f"{spelled(a)} {spelled(b)}" for a, b in bpe.merges]
    w = gguf.GGUFWriter(str(path), "llama")
    dim, n_layers, n_heads, hidden = 32, 1, 4, 48
    w.add_block_count(n_layers); w.add_context_length(64); w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden); w.add_head_count(n_heads); w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0); w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model); w.add_tokenizer_pre(pre)
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(merges)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    if with_tensors:
        rng = np.random.default_rng(0)
        shapes = {"token_embd.weight": (len(tokens), dim), "output_norm.weight": (dim,),
                  "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
                  "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim // 2, dim),
                  "blk.0.attn_v.weight": (dim // 2, dim), "blk.0.attn_output.weight": (dim, dim),
                  "blk.0.ffn_gate.weight": (hidden, dim), "blk.0.ffn_up.weight": (hidden, dim),
                  "blk.0.ffn_down.weight": (dim, hidden)}
        for name, shape in shapes.items():
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    ours = GGUFTokenizer.from_gguf(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert ours.missing_bytes == [0x04, 0x7F] and "<｜sep｜>" not in ours.special_tokens
    texts = [TINY_TEXT, "the <think> cat<|im_end|>sat<｜sep｜>.\x04.", "x\x7fy the\x7f\x7fcat", "<think><think>",
             "unseen words: zebra quokka 🦙", *CORPUS.values()]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), repr(text)
        assert ours.encode(text, split_special_tokens=True) == theirs.encode(text, add_special_tokens=False,
                                                                             split_special_tokens=True), repr(text)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    chat = CONVERSATIONS["multi-turn"]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False)


def test_load_gguf_tiny(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_gguf(path, max_seq_len=32)
    assert isinstance(model, Transformer) and isinstance(tokenizer, GGUFTokenizer)
    assert model.args.max_seq_len == 32 and model.args.vocab_size == tokenizer.vocab_size
    ids = tokenizer.encode("the cat", bos=True)
    assert model(torch.tensor([ids])).shape == (1, len(ids), tokenizer.vocab_size)
    ref = load_gguf_model(read_gguf(path), max_seq_len=32)    # the same weights as the model loader's
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], w) for k, w in ref.state_dict().items())
    model, _ = load_gguf(read_gguf(path))                     # a GGUFFile works too; context length from the file
    assert model.args.max_seq_len == 64


def test_unsupported_tokenizers_fail_before_loading_weights(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'.*SentencePiece"):
        load_gguf(write_tiny_gguf(tmp_path / "spm.gguf", model="llama", with_tensors=False))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'llama-bpe', whose split regex is not GPT-2's"):
        GGUFTokenizer.from_gguf(write_tiny_gguf(tmp_path / "l3.gguf", pre="llama-bpe", with_tensors=False))
    with pytest.raises(TypeError, match="expected a GGUFFile .* got str; for a file path use GGUFTokenizer.from_gguf"):
        GGUFTokenizer("model.gguf")
    with pytest.raises(ValueError, match="has no tokenizer.ggml.tokens"):
        GGUFTokenizer({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(FileNotFoundError):
        GGUFTokenizer.from_gguf(tmp_path / "missing.gguf")


def test_tokenizer_from_metadata_dict_and_no_template(gf, tok):
    md = {k: v for k, v in gf.metadata.items() if k != "tokenizer.chat_template"}
    plain = GGUFTokenizer(md)
    assert plain.encode(CORPUS["emoji"]) == tok.encode(CORPUS["emoji"])
    with pytest.raises(ValueError, match="has no tokenizer.chat_template"):
        plain.apply_chat_template(CONVERSATIONS["user"])
    md.pop("tokenizer.ggml.bos_token_id")
    with pytest.raises(ValueError, match="bos=True but the GGUF has no tokenizer.ggml.bos_token_id"):
        GGUFTokenizer(md).encode("x", bos=True)


# ---------------------------------------------------------------- load_smollm2

def test_load_smollm2_default_max_seq_len(monkeypatch, smollm2_path):
    seen = {}
    monkeypatch.setattr(G, "load_gguf", lambda path, max_seq_len=None: seen.update(path=path, max_seq_len=max_seq_len))
    G.load_smollm2(progress=False)
    assert seen == {"path": smollm2_path, "max_seq_len": 2048} and G.SMOLLM2_MAX_SEQ_LEN == 2048
    G.load_smollm2(max_seq_len=None, progress=False)
    assert seen["max_seq_len"] is None


def test_load_smollm2_answers(hf_tok):
    model, tokenizer = load_smollm2(progress=False)
    assert model.args.max_seq_len == 2048 and model.args.n_layers == 30 and tokenizer.vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    new = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
        for pos in range(len(ids), len(ids) + 6):             # "The capital of France is Paris"
            new.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([new[-1:]]), start_pos=pos)
    assert "Paris" in tokenizer.decode(new)


# ---------------------------------------------------------------- exercise checkers

def test_check_bytes_to_unicode():
    my_table = source_copy(G, "bytes_to_unicode")
    assert check_bytes_to_unicode(my_table)

    def soft_hyphen_printable():
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}

    def space_kept():
        table = my_table()
        table[32] = " "
        return table

    def not_one_to_one():
        return {b: chr(b) if 33 <= b <= 126 else "?" for b in range(256)}

    def too_short():
        return {b: c for b, c in my_table().items() if b < 255}

    r = check_bytes_to_unicode(soft_hyphen_printable)
    assert not r and "table[173]" in str(r) and "soft hyphen" in str(r)
    r = check_bytes_to_unicode(space_kept)
    assert not r and "table[32]" in str(r) and "space (32)" in str(r)
    r = check_bytes_to_unicode(not_one_to_one)
    assert not r and "two bytes map to" in str(r) and "one-to-one" in str(r)
    r = check_bytes_to_unicode(too_short)
    assert not r and "keys should be the ints 0..255" in str(r)
    r = check_bytes_to_unicode(lambda: list(range(256)))
    assert not r and "expected a dict" in str(r)


def test_check_bpe_word():
    my_bpe_word = source_copy(G, "bpe_word")
    assert check_bpe_word(my_bpe_word)

    def leftmost_first(word, ranks):
        symbols = list(word)
        while True:
            i = next((i for i in range(len(symbols) - 1) if (symbols[i], symbols[i + 1]) in ranks), None)
            if i is None:
                return symbols
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]

    def dict_order(word, ranks):     # uses the position in the dict as the rank
        order = {pair: i for i, pair in enumerate(ranks)}
        return my_bpe_word(word, order)

    def one_merge_only(word, ranks):
        symbols = list(word)
        pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
        if pairs:
            pair = min(pairs, key=ranks.get)
            i = list(zip(symbols, symbols[1:])).index(pair)
            symbols[i:i + 2] = [pair[0] + pair[1]]
        return symbols

    r = check_bpe_word(leftmost_first)
    assert not r and "lowest rank first, not leftmost" in str(r) and "expected ['a', 'bc']" in str(r)
    r = check_bpe_word(dict_order)
    assert not r and "rank values, not dict order" in str(r)
    r = check_bpe_word(one_merge_only)
    assert not r and "a merge that builds on a merge" in str(r)
    r = check_bpe_word(lambda word, ranks: [word] if word else [])
    assert not r and "no ranks" in str(r)
    r = check_bpe_word(lambda word, ranks: list(word.encode()))
    assert not r


def test_checkers_refuse_the_library_and_its_copies_elsewhere():
    from gguf.vocab import bytes_to_unicode as gguf_bytes_to_unicode
    from transformers.models.clvp.tokenization_clvp import bytes_to_unicode as clvp_bytes_to_unicode
    for table in (bytes_to_unicode, hf_bytes_to_unicode, gguf_bytes_to_unicode):
        assert refused(check_bytes_to_unicode(table), "bytes_to_unicode"), table.__module__
    assert refused(check_bytes_to_unicode(lambda: dict(hf_bytes_to_unicode())), "bytes_to_unicode")
    assert refused(check_bytes_to_unicode(lambda: dict(gguf_bytes_to_unicode())), "bytes_to_unicode")
    clvp_bytes_to_unicode.cache_clear()              # an lru_cache: refused when it runs, not on a cache hit
    assert refused(check_bytes_to_unicode(lambda: dict(clvp_bytes_to_unicode())), "bytes_to_unicode")

    assert refused(check_bpe_word(bpe_word), "bpe_word")
    assert refused(check_bpe_word(lambda word, ranks: bpe_word(word, ranks)), "bpe_word")

    def via_apply_merges(merge, word, ranks):          # renumber the characters and ranks, let an encoder merge
        symbols = sorted(set(word) | {s for pair in ranks for s in pair} | {a + b for a, b in ranks})
        number = {s: i for i, s in enumerate(symbols)}
        merges = {(number[a], number[b]): len(symbols) + r for (a, b), r in ranks.items() if a + b in number}
        name = {**{i: s for s, i in number.items()},
                **{len(symbols) + r: a + b for (a, b), r in ranks.items()}}
        return [name[i] for i in merge([number[c] for c in word], merges)]
    from course_lib.tokenizer import apply_merges
    for merge in (apply_merges, G.apply_merges_heap):
        r = check_bpe_word(lambda word, ranks: via_apply_merges(merge, word, ranks))
        assert refused(r, merge.__name__), str(r)


def first_misordered_merge(merges):
    "07b's Exercise 3, written another way than the checker's reference: the rank at which each token first exists."
    born = {c: -1 for c in bytes_to_unicode().values()}       # single byte characters exist before any merge
    for rank, merge in enumerate(merges):
        born.setdefault(merge.replace(" ", ""), rank)
    late = [r for r, m in enumerate(merges) if any(born.get(part, len(merges)) >= r for part in m.split(" "))]
    return min(late, default=None)


def test_check_first_misordered_merge():
    # hand-made answers, independent of both implementations
    assert first_misordered_merge(["a b", "ab c"]) is None
    assert first_misordered_merge(["ab c", "a b"]) == 0            # "ab" is only made at rank 1
    assert first_misordered_merge(["a b", "c d", "ab cde"]) == 2   # "cde" is never made
    assert check_first_misordered_merge(first_misordered_merge)

    def all_made_upfront(merges):                   # counts every merge's result as available from the start
        made = set(bytes_to_unicode().values()) | {m.replace(" ", "") for m in merges}
        return next((r for r, m in enumerate(merges) if not all(p in made for p in m.split(" "))), None)

    def left_part_only(merges):
        made = set(bytes_to_unicode().values())
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ")
            if left not in made:
                return rank
            made.add(left + right)
        return None

    def ascii_only_alphabet(merges):                # single characters only from printable ASCII
        made = {chr(c) for c in range(33, 127)}
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ")
            if left not in made or right not in made:
                return rank
            made.add(left + right)
        return None

    r = check_first_misordered_merge(all_made_upfront)
    assert not r and "the left part made later" in str(r)
    r = check_first_misordered_merge(left_part_only)
    assert not r and "only the right part made later" in str(r)
    r = check_first_misordered_merge(ascii_only_alphabet)
    assert not r and "expected None" in str(r)
    r = check_first_misordered_merge(lambda merges: False)
    assert not r and "an int (a rank) or None" in str(r)


def test_first_misordered_merge_on_smollm2(gf):
    assert first_misordered_merge(gf.metadata["tokenizer.ggml.merges"]) is None


def test_checkers_on_stubs_and_non_callables():
    def stub(*args):
        raise NotImplementedError

    for checker in (check_bytes_to_unicode, check_bpe_word, check_first_misordered_merge):
        r = checker(stub)
        rest = "the other case was not run" if r.n_cases == 2 else f"the other {r.n_cases - 1} cases were not run"
        assert not r and len(r.failures) == 1 and f"raised NotImplementedError, so {rest}" in str(r)
        with pytest.raises(TypeError):
            checker(42)


LONG_ALPHABETS = {"latin letters": "abcdefghijklmnopqrstuvwxyz", "CJK": "".join(map(chr, range(0x4E00, 0x4F00))),
                  "base64": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"}


@pytest.mark.parametrize("script", LONG_ALPHABETS)
def test_long_text_without_spaces_equals_transformers_and_grows_linearly(tok, hf_tok, script):
    "Issue 14: one 100k-character chunk (no spaces) was quadratic; the heap BPE is O(n log n)."
    import random
    import time
    rng = random.Random(0)
    text = "".join(rng.choice(LONG_ALPHABETS[script]) for _ in range(100_000))
    tok._cache.clear()
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    def seconds(s):
        tok._cache.clear()
        t0 = time.perf_counter()
        tok.encode(s)
        return time.perf_counter() - t0
    short, long = min(seconds(text[:20_000]) for _ in range(2)), min(seconds(text) for _ in range(2))
    assert long < 12 * short, (short, long)          # 5x the text: about 5x the time; quadratic would be 25x


def test_apply_merges_heap_equals_apply_merges(tok):
    import random
    from course_lib.gguf_tokenizer import apply_merges_heap
    from course_lib.tokenizer import apply_merges
    rng = random.Random(3)
    for _ in range(500):
        data = list("".join(rng.choice("ab c\u00e9") for _ in range(rng.randrange(0, 80))).encode())
        assert apply_merges_heap(data, tok.merges) == apply_merges(data, tok.merges), data
    assert apply_merges_heap([], tok.merges) == [] and apply_merges_heap([97], tok.merges) == [97]
