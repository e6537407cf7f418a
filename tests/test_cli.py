"""`python -m course_lib`: generate and chat on the real model, and one-line errors."""
import argparse
import subprocess
import sys

import pytest

import copy
import dataclasses

import course_lib.cli as cli
from shortcuts import refused, source_copy
from course_lib.generation import generate
from course_lib.gguf_tokenizer import load_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(max_seq_len=256)


@pytest.fixture
def loaded(smollm2, monkeypatch):
    "Load the model once for the whole file: main() would load it on every call."
    monkeypatch.setattr(cli, "load_model", lambda model="smollm2", max_seq_len=None, quant="none", device="cpu": smollm2)
    return smollm2


def test_generate_prints_the_greedy_completion(loaded, capsys):
    model, tokenizer = loaded
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "8", "--no-stats"]) == 0
    expected = generate(model, tokenizer, "The capital of France is", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


def test_seeded_sampling_repeats(loaded, capsys):
    args = ["generate", "Once upon a time", "--max-new-tokens", "10", "--method", "top_p", "--top-p", "0.9",
            "--temperature", "0.8", "--seed", "3", "--no-stats"]
    cli.main(args); first = capsys.readouterr().out
    cli.main(args); second = capsys.readouterr().out
    assert first == second and first.strip()


def test_stats_go_to_stderr(loaded, capsys):
    cli.main(["generate", "Hi", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err


def test_bad_option_value_is_one_line(loaded, capsys):
    assert cli.main(["generate", "hello", "--method", "top_p", "--top-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "top_p" in err and "1.5" in err


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "hello", "--method", "beam"])
    assert e.value.code == 2 and "invalid choice: 'beam'" in capsys.readouterr().err


def test_missing_model_file(capsys, tmp_path):
    assert cli.main(["generate", "hi", "--model", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and err.count("\n") == 1


def test_prompt_longer_than_the_cache(loaded, capsys):
    assert cli.main(["generate", "word " * 300, "--no-stats"]) == 1
    assert "--max-seq-len" in capsys.readouterr().err


def test_chat_answers_and_keeps_the_conversation(loaded, capsys):
    model, tokenizer = loaded
    lines = iter(["What is the capital of France?", "/reset", "/quit"])
    ns = argparse.Namespace(model="smollm2", max_seq_len=None, system=None, max_new_tokens=12, method="greedy",
                            temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None, stats=False,
                            quant="none", device="cpu")
    cli._run_chat(ns, inp=lambda: next(lines))
    out = capsys.readouterr().out
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    assert out == "model> " + generate(model, tokenizer, prompt, max_new_tokens=12) + "\n"
    assert "Paris" in out


def test_module_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "course_lib", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in ("fetch", "generate", "chat"))


def test_quant_decodes_with_the_fast_quantized_path(smollm2, monkeypatch, capsys):
    from course_lib.fast_cpu import FastQuantModel
    from course_lib.quant_model import quantize_model
    model, tokenizer = smollm2
    monkeypatch.setattr(cli, "_load_float", lambda name, max_seq_len: (copy.deepcopy(model), tokenizer))
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "8", "--quant", "q4_1",
                     "--no-stats"]) == 0
    fast = FastQuantModel(quantize_model(copy.deepcopy(model), "q4_1"))
    assert capsys.readouterr().out == generate(fast, tokenizer, "The capital of France is", max_new_tokens=8) + "\n"


def test_unknown_quant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "hi", "--quant", "q3_k"])
    assert e.value.code == 2 and "--quant" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--quant must be one of none, q8_0, q4_0, q4_1, got 'int3'"):
        cli.load_model("smollm2", quant="int3")


def test_device_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    import course_lib.cuda as cuda
    monkeypatch.setattr(cuda, "gpu_available", lambda: (False, "CuPy is not installed (pip install cupy-cuda12x)"))
    monkeypatch.setattr(cli, "_load_float", lambda *a: pytest.fail("the model was loaded before the GPU check"))
    assert cli.main(["generate", "hi", "--device", "cuda", "--quant", "q4_0"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: --device cuda needs an NVIDIA GPU with CuPy: CuPy is not installed "
                   "(pip install cupy-cuda12x); use --device cpu\n")


def test_device_cuda_is_quantized_only(capsys):
    assert cli.main(["generate", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add --quant q8_0, q4_0 or q4_1" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "hi", "--device", "tpu"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="--device must be one of cpu, cuda, got 'gpu'"):
        cli.load_model("smollm2", quant="q4_0", device="gpu")


def test_device_cuda_really_without_a_gpu(capsys):
    from course_lib.cuda import gpu_available
    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    assert cli.main(["generate", "hi", "--device", "cuda", "--quant", "q4_0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda needs an NVIDIA GPU with CuPy: ") and err.count("\n") == 1


# -- issue 14: no traceback for any bad input

def test_an_upper_case_gguf_suffix_is_a_gguf_file(smollm2, tmp_path, capsys, monkeypatch):
    from course_lib import fetch_smollm2
    link = tmp_path / "SmolLM2.GGUF"
    link.symlink_to(fetch_smollm2(progress=False))
    seen = {}
    monkeypatch.setattr(cli, "load_gguf", lambda path, **kw: seen.setdefault("path", path) and smollm2)
    assert cli.main(["generate", "hi", "--model", str(link), "--max-new-tokens", "2", "--no-stats"]) == 0
    assert seen["path"] == link


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**70)], "seed must be between 0 and 2**64 - 1"),
    (["--max-seq-len", "1000000000"], "GiB, more than"),
])
def test_oversized_values_are_one_line(args, message, capsys):
    assert cli.main(["generate", "hi", "--max-new-tokens", "2", "--no-stats", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_ctrl_c_stops_the_answer_then_the_chat(loaded, capsys, monkeypatch):
    calls = []
    def interrupted(*args):
        calls.append(args)
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_stream", interrupted)
    lines = iter(["a question", "/quit"])
    ns = argparse.Namespace(model="smollm2", max_seq_len=None, system=None, max_new_tokens=4, method="greedy",
                            temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None, stats=False,
                            quant="none", device="cpu")
    cli._run_chat(ns, inp=lambda: next(lines))         # returns: the chat went on to /quit
    assert len(calls) == 1 and "(stopped; the question is forgotten)" in capsys.readouterr().err
    def ctrl_c(a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run_generate", ctrl_c)
    assert cli.main(["generate", "hi"]) == 130
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- issue 14: every bad input is one line, no traceback

G = ["generate", "hi", "--max-new-tokens", "2", "--no-stats"]
C = ["chat", "--max-new-tokens", "2", "--no-stats"]


def _bad_inputs(tmp):
    (tmp / "junk.gguf").write_bytes(b"hello, not a gguf")
    (tmp / "folder.gguf").mkdir()
    (tmp / "sub.py").write_text("def f(:\n")
    sub = str(tmp / "sub.py")
    return [   # (argv, stdin, part of the message)
        (G + ["--max-new-tokens", "-1"], "", "--max-new-tokens must be >= 0, got -1"),
        (G + ["--method", "temperature", "--temperature", "nan"], "", "temperature must be a finite real number"),
        (G + ["--method", "temperature", "--temperature", "0"], "", "temperature must be > 0"),
        (G + ["--method", "top_k", "--top-k", "0"], "", "top_k must be >= 1"),
        (G + ["--method", "top_p", "--top-p", "nan"], "", "top_p must be a finite real number"),
        (G + ["--method", "min_p", "--min-p", "2"], "", "min_p must be in [0, 1]"),
        (G + ["--top-k", "5"], "", "top_k=5 is not used by method='greedy'"),
        (G + ["--seed", "-1"], "", "seed must be between 0 and 2**64 - 1"),
        (G + ["--max-seq-len", "0"], "", "--max-seq-len must be >= 1, got 0"),
        (G + ["--max-seq-len", "1"], "", "the prompt has 1 tokens, the model holds 1"),
        (G + ["--model", ""], "", "expected a .gguf file"),
        (G + ["--model", str(tmp / "junk.gguf")], "", "is not a GGUF file"),
        (G + ["--model", str(tmp / "folder.gguf")], "", "is a folder, not a GGUF file"),
        (G + ["--model", sub], "", "expected a .gguf file"),
        (["generate", "", "--no-stats"], "", "prompt_ids is empty"),
        (["generate", "a\udcff", "--no-stats"], "", "not valid Unicode"),
        (C + ["--method", "top_p", "--top-p", "2"], "hi\n", "top_p must be in (0, 1]"),
        (C + ["--max-seq-len", "32", "--system", "x " * 100], "hi\n", "--system: the system message takes"),
        (C + ["--model", str(tmp / "folder.gguf")], "hi\n", "is a folder"),
        (["fetch", "--quiet", "--cache-dir", sub], "", "is a file; give a folder"),
        (["grade", "attention", sub, "--timeout", "nan"], "", "timeout must be positive and finite, got nan"),
        (["grade", "attention", sub, "--memory-mb", "inf"], "", "memory_mb must be positive and finite, got inf"),
        (["grade", "attention", sub, "--csv", str(tmp)], "", "it is a folder"),
        (["grade", "attention", sub, "--csv", str(tmp / "no" / "g.csv")], "", "is not a folder"),
        (["grade", "attention", sub, "--hide", str(tmp / "typo")], "", "typo does not exist"),
        (["grade", "attention", sub, str(tmp / "no" / "sub.py")], "", "would both be graded as student 'sub'"),
    ]


def test_bad_inputs_are_one_line_without_a_traceback(tmp_path, capsys, monkeypatch):
    "Every case fails before grading or generating anything, with exit code 1 and one line naming the problem."
    import io
    failures = []
    monkeypatch.chdir(tmp_path)                                      # where grade writes grades-attention.csv
    for argv, stdin, message in _bad_inputs(tmp_path):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = cli.main(argv)
        except BaseException as e:                                   # noqa: BLE001 - any escape is the failure
            failures.append((argv[:1] + argv[-2:], f"escaped {type(e).__name__}: {e}"))
            continue
        captured = capsys.readouterr()
        lines = [l for l in captured.err.splitlines() if not l.startswith("chat with the model")]
        if code != 1 or len(lines) != 1 or not lines[0].startswith("error: ") or message not in lines[0]:
            failures.append((argv[:1] + argv[-2:], code, captured.err[-300:]))
        assert not list(tmp_path.rglob("*.csv")), f"{argv}: graded before failing"
    assert not failures, "\n".join(map(str, failures))


def test_huge_top_k_keeps_every_token(loaded, capsys):
    "top_k beyond the vocabulary keeps everything (it was an OverflowError past 2**63)."
    assert cli.main(G + ["--method", "top_k", "--top-k", str(2**70), "--seed", "1"]) == 0


def test_chat_skips_empty_lines(loaded, capsys):
    lines = iter(["", "   ", "/quit"])
    ns = argparse.Namespace(model="smollm2", max_seq_len=None, system=None, max_new_tokens=2, method="greedy",
                            temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None, stats=False,
                            quant="none", device="cpu")
    cli._run_chat(ns, inp=lambda: next(lines))
    assert "model>" not in capsys.readouterr().out


# ---------------------------------------------------------------- the chat window (fit_conversation)

def words(messages):
    return sum(len(m["content"].split()) + 3 for m in messages)


def turns(n, system=True):
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for i in range(n):
        messages += [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]
    return messages + [{"role": "user", "content": "last one"}]


def test_fit_conversation_keeps_the_latest_whole_turns_and_the_system_message():
    from course_lib import fit_conversation
    chat = turns(4)                                          # 5 + 4 × 10 + 5 = 50 tokens
    assert fit_conversation(chat, words, 50) == (chat, 0)
    kept, dropped = fit_conversation(chat, words, 49)
    assert dropped == 2 and kept == chat[:1] + chat[3:]      # the oldest question and its answer
    kept, dropped = fit_conversation(chat, words, 10)
    assert dropped == 8 and kept == [chat[0], chat[-1]]
    kept, dropped = fit_conversation(turns(2, system=False), words, 15)
    assert dropped == 2 and kept[0] == {"role": "user", "content": "q 1"}
    lone = [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]   # no answer in between
    assert fit_conversation(lone, words, 4) == ([lone[1]], 1)
    before = list(chat)
    fit_conversation(chat, words, 10)
    assert chat == before                                    # the caller's list is not changed


def test_fit_conversation_bad_input():
    from course_lib import fit_conversation
    with pytest.raises(ValueError, match=r"the last message and the system message alone take 10 tokens, more than the 9"):
        fit_conversation(turns(3), words, 9)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        fit_conversation(turns(1), words, 0)
    with pytest.raises(TypeError, match="messages must be a non-empty list"):
        fit_conversation([], words, 10)


def test_checker_of_fit_conversation():
    from course_lib import check
    assert check.fit_conversation(source_copy(cli, "_drop_count", "fit_conversation")[-1])

    def keeps_everything(messages, count_tokens, max_tokens):
        return list(messages), 0

    def drops_the_system_message(messages, count_tokens, max_tokens):
        kept = list(messages)
        while count_tokens(kept) > max_tokens:
            kept = kept[1:]
        return kept, len(messages) - len(kept)
    assert "more than max_tokens" in str(check.fit_conversation(keeps_everything))
    assert "the system message is gone" in str(check.fit_conversation(drops_the_system_message))


def test_chat_forgets_the_oldest_turns_when_the_window_is_full(smollm2, capsys, monkeypatch):
    model, tokenizer = smollm2
    small = copy.deepcopy(model)
    small.args = dataclasses.replace(model.args, max_seq_len=96)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (small, tokenizer))
    ns = argparse.Namespace(model="smollm2", max_seq_len=None, system="Answer in a few words.", max_new_tokens=8,
                            method="greedy", temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None,
                            stats=False, quant="none", device="cpu")
    lines = iter(["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Germany?"])

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    cli._run_chat(ns, inp=read)
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 4
    assert "Berlin" in captured.out.splitlines()[-1]                 # the last question still has its context
    assert "forgot the oldest" in captured.err and "96-token window" in captured.err
    assert "error" not in captured.err


def test_checker_of_fit_conversation_refuses_the_library():
    from course_lib import check
    assert refused(check.fit_conversation(cli.fit_conversation), "fit_conversation")

    def via_library(messages, count_tokens, max_tokens):
        return cli.fit_conversation(messages, count_tokens, max_tokens)

    def own_loop_library_turns(messages, count_tokens, max_tokens):       # borrows only the turn-size helper
        system = messages[:1] if messages[0]["role"] == "system" else []
        rest, dropped = messages[len(system):], 0
        while count_tokens(system + rest) > max_tokens:
            if len(rest) <= 1:
                raise ValueError("too long")
            k = cli._drop_count(rest, 0)
            rest, dropped = rest[k:], dropped + k
        return system + rest, dropped
    assert check.fit_conversation(source_copy(cli, "_drop_count", "fit_conversation")[-1])
    assert refused(check.fit_conversation(via_library), "fit_conversation")
    assert refused(check.fit_conversation(own_loop_library_turns), "_drop_count")


def prefill_per_turn(system_tokens, turns, max_tokens):
    "Exercise 2 of 07d, answered (the notebook's appendix has the same)."
    sizes = []
    for n, (question, _) in enumerate(turns):
        if system_tokens + question > max_tokens:
            raise ValueError("the system message and the question do not fit")
        kept = [q + a for q, a in turns[:n]]
        while system_tokens + sum(kept) + question > max_tokens:
            kept.pop(0)
        sizes.append(system_tokens + sum(kept) + question)
    return sizes


def test_checker_of_prefill_per_turn_accepts_an_answer():
    from course_lib import check
    assert check.prefill_per_turn(prefill_per_turn)


def test_checker_of_prefill_per_turn_names_the_usual_mistakes():
    from course_lib import check

    def never_forgets(s, turns, m):
        return [s + sum(q + a for q, a in turns[:n]) + turns[n][0] for n in range(len(turns))]

    def no_system(s, turns, m):
        return prefill_per_turn(0, turns, m)

    def keeps_the_oldest(s, turns, m):
        sizes = []
        for n, (question, _) in enumerate(turns):
            kept = [q + a for q, a in turns[:n]]
            while s + sum(kept) + question > m:
                kept.pop()                                   # drops the newest: wrong end
            sizes.append(s + sum(kept) + question)
        return sizes

    def forgets_everything(s, turns, m):                    # clears the whole history once it does not fit
        sizes, start = [], 0
        for n, (question, _) in enumerate(turns):
            if s + sum(q + a for q, a in turns[start:n]) + question > m:
                start = n
            sizes.append(s + sum(q + a for q, a in turns[start:n]) + question)
        return sizes

    def no_value_error(s, turns, m):
        return [min(p, m) for p in never_forgets(s, turns, m)]
    assert "never forgets" in str(check.prefill_per_turn(never_forgets))
    assert "system message out" in str(check.prefill_per_turn(no_system))
    assert "newest earlier turns" in str(check.prefill_per_turn(keeps_the_oldest))
    assert not check.prefill_per_turn(forgets_everything)
    assert "raise ValueError" in str(check.prefill_per_turn(no_value_error))
    assert "list of ints" in str(check.prefill_per_turn(lambda s, t, m: tuple(prefill_per_turn(s, t, m))))


def test_checker_of_prefill_per_turn_refuses_fit_conversation():
    from course_lib import check

    def via_fit_conversation(s, turns, m):
        words = lambda k: " ".join(["w"] * k)
        count = lambda ms: sum(len(x["content"].split()) for x in ms)
        system = [{"role": "system", "content": words(s)}] if s else []
        sizes, history = [], []
        for q, a in turns:
            kept, _ = cli.fit_conversation(system + history + [{"role": "user", "content": words(q)}], count, m)
            sizes.append(count(kept))
            history += [{"role": "user", "content": words(q)}, {"role": "assistant", "content": words(a)}]
        return sizes
    assert refused(check.prefill_per_turn(via_fit_conversation), "fit_conversation")

