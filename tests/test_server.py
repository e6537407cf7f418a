"""Chapter 11c: the OpenAI-compatible server, tested with the official `openai` client against uvicorn on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from course_lib import check, fetch_smollm2, generate_tokens, load_gguf_model, read_gguf, GGUFTokenizer  # noqa: E402
from course_lib.checks import server as checks_server  # noqa: E402
from course_lib.serving import server  # noqa: E402
from course_lib.serving.server import (BadRequest, ServerThread, TextStream, create_app, openai_error,  # noqa: E402
                                       parse_request, sampling_from_request, sse_event)
from shortcuts import refused, source_copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time, a robot", "def fibonacci(n):",
           "List three colors:", "Water boils at", "The best way to learn is"]


@pytest.fixture(scope="module")
def smollm2():
    gguf = read_gguf(fetch_smollm2(progress=False))
    return load_gguf_model(gguf, max_seq_len=512).eval(), GGUFTokenizer(gguf)


@pytest.fixture(scope="module")
def served(smollm2):
    "(app, base url): one server for the whole file, on a free port, stopped at the end."
    model, tokenizer = smollm2
    app = create_app(model, tokenizer, model_id="smollm2", max_batch_size=8)
    with ServerThread(app) as running:
        yield app, running.url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1], api_key="anything", max_retries=0, timeout=120)


def alone(smollm2, prompt_ids, n) -> str:
    "The one-request greedy answer of chapter 07c, as text without eos."
    model, tokenizer = smollm2
    out = [t for t in generate_tokens(model, prompt_ids, n, eos_id=tokenizer.eos_id) if t != tokenizer.eos_id]
    return tokenizer.decode(out)


def chat_ids(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_completion_at_temperature_0_equals_one_request_greedy(client, smollm2):
    r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == alone(smollm2, smollm2[1].encode(PROMPTS[0]), 12)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(smollm2[1].encode(PROMPTS[0])), 12)


def test_chat_at_temperature_0_equals_one_request_greedy_and_stops_at_the_end_token(client, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0)
    ids = chat_ids(smollm2[1], messages)
    assert r.choices[0].message.content == alone(smollm2, ids, 40)
    assert r.choices[0].finish_reason == "stop"                     # <|im_end|> came before 40 tokens
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)


def test_streamed_chat_deltas_add_up_to_the_answer(client):
    messages = [{"role": "user", "content": "Name a fruit and say why you like it."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
    deltas, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(deltas) == full.choices[0].message.content and len(deltas) > 3
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_streamed_completion_ends_with_done(served, smollm2):
    body = {"model": "smollm2", "prompt": PROMPTS[4], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served[1]}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    chunks = _parse_sse_another_way(text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone(smollm2, smollm2[1].encode(PROMPTS[4]), 6)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_six_concurrent_requests_are_batched_and_each_equals_its_greedy_answer(served, client, smollm2):
    engine_loop = served[0].state.engine_loop
    lengths = [16, 6, 12, 8, 10, 4]
    answers, errors = [None] * 6, []

    def ask(i):
        try:
            answers[i] = client.completions.create(model="smollm2", prompt=PROMPTS[i], max_tokens=lengths[i],
                                                   temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    start = len(engine_loop.log)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert answers == [alone(smollm2, smollm2[1].encode(p), n) for p, n in zip(PROMPTS, lengths)]
    batched = max(len(e[3]) for e in list(engine_loop.log)[start:] if e[0] == "step")
    assert batched > 1, "no step served two of the concurrent requests"
    assert engine_loop.max_batch >= batched
    assert engine_loop.engine.pages_in_use == 0 and not engine_loop.engine.requests   # all finished and forgotten


@pytest.mark.parametrize("kwargs, error, status, param", [
    (dict(model="gpt-4o"), "NotFoundError", 404, "model"),
    (dict(max_tokens=0), "BadRequestError", 400, "max_tokens"),
    (dict(max_tokens=-3), "BadRequestError", 400, "max_tokens"),
    (dict(max_tokens=10_000), "BadRequestError", 400, "max_tokens"),
    (dict(temperature=2.5), "BadRequestError", 400, "temperature"),
    (dict(temperature=-0.5), "BadRequestError", 400, "temperature"),
    (dict(top_p=0), "BadRequestError", 400, "top_p"),
    (dict(seed=-1), "BadRequestError", 400, "seed"),
    (dict(stop=["\n"]), "BadRequestError", 400, "stop"),
    (dict(n=2), "BadRequestError", 400, "n"),
    (dict(prompt="word " * 600), "BadRequestError", 400, "prompt"),
])
def test_bad_requests_get_openai_error_objects(client, kwargs, error, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**{"model": "smollm2", "prompt": "Hi", "max_tokens": 4, **kwargs})
    assert type(e.value).__name__ == error and e.value.status_code == status
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_chat_with_a_bad_message_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user"}], max_tokens=4)
    assert e.value.body["param"] == "messages" and "content" in e.value.body["message"]


@pytest.mark.parametrize("raw", [b'{"model": "smollm2", "prompt": ', b"", b"\xff\xfe", b"[1, 2]", b"null"])
def test_malformed_json_is_400_not_422(served, raw):
    response = httpx.post(f"{served[1]}/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_path_is_an_openai_404(served):
    response = httpx.get(f"{served[1]}/engines")
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_disconnects_mid_stream_frees_its_pages(served):
    engine_loop = served[0].state.engine_loop
    before = engine_loop.aborted
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{served[1]}/completions", json=body, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: {")
        assert engine_loop.engine.pages_in_use > 0                  # the request is running
    deadline = time.monotonic() + 30
    while (engine_loop.aborted == before or engine_loop.engine.pages_in_use) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine_loop.aborted == before + 1
    assert engine_loop.engine.pages_in_use == 0 and not engine_loop.engine.requests
    assert engine_loop.max_batch >= 1 and engine_loop._thread.is_alive()


def test_an_engine_failure_is_a_500_and_the_server_goes_on(served, client, monkeypatch):
    engine = served[0].state.engine_loop.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()
    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, temperature=0)
    assert "boom" in e.value.body["message"]
    assert engine.pages_in_use == 0
    r = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


# the pure parts, without a server

def test_text_stream_waits_for_split_characters(smollm2):
    tokenizer = smollm2[1]
    text = "Llamas 🦙 au café, 東京"
    stream = TextStream(tokenizer, tokenizer.eos_id)
    pieces = [stream.push(i) for i in tokenizer.encode(text)] + [stream.push(tokenizer.eos_id), stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_sampling_from_request_maps_openai_parameters():
    assert sampling_from_request({"temperature": 0, "top_p": 0.3}) == {"method": "greedy"}
    assert sampling_from_request({"temperature": 1, "top_p": 0.5, "seed": 2}) == {
        "method": "top_p", "temperature": 1.0, "top_p": 0.5, "seed": 2}
    assert sampling_from_request({}) == {"method": "temperature", "temperature": 1.0, "seed": None}
    for bad in ({"temperature": True}, {"top_p": 1.5}, {"seed": 1.5}, {"temperature": "0"}):
        with pytest.raises(BadRequest):
            sampling_from_request(bad)
    with pytest.raises(TypeError):
        sampling_from_request("temperature=0")


def test_parse_request_checks_the_model_and_the_context(smollm2):
    tokenizer = smollm2[1]
    job = parse_request({"model": "m", "prompt": [5, 6, 7], "max_tokens": 3}, tokenizer, "m", 16, chat=False)
    assert job["prompt_ids"] == [5, 6, 7] and job["max_new_tokens"] == 3 and not job["stream"]
    assert parse_request({"model": "m", "prompt": "Hi"}, tokenizer, "m", 512, chat=False)["max_new_tokens"] == 16
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
                         tokenizer, "m", 512, chat=True)
    assert chat["max_new_tokens"] == 512 - len(chat["prompt_ids"])       # chat: the room left by default
    for body, param, status in [({"model": "x", "prompt": "Hi"}, "model", 404), ({"prompt": "Hi"}, "model", 400),
                                ({"model": "m", "prompt": [5, 10**6]}, "prompt", 400),
                                ({"model": "m", "prompt": ""}, "prompt", 400),
                                ({"model": "m", "prompt": "Hi", "stream": "yes"}, "stream", 400),
                                ({"model": "m", "prompt": list(range(1, 17))}, "prompt", 400),
                                ({"model": "m", "prompt": "Hi", "max_tokens": 2.5}, "max_tokens", 400)]:
        with pytest.raises(BadRequest) as e:
            parse_request(body, tokenizer, "m", 16, chat=False)
        assert (e.value.param, e.value.status) == (param, status), body


def test_openai_error_and_sse_event_refuse_bad_input():
    assert openai_error(500, "x")["error"]["type"] == "server_error"
    for status in (200, 600, True, "400"):
        with pytest.raises(ValueError):
            openai_error(status, "x")
    with pytest.raises(TypeError):
        sse_event(["a"])
    with pytest.raises(TypeError):
        sse_event("DONE")


def test_course_lib_imports_without_fastapi():
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "import course_lib, course_lib.check, course_lib.serving.server as s\n"
            "print(s.sse_event('[DONE]') == 'data: [DONE]\\n\\n')\n"
            "try:\n    s.create_app(None, None)\nexcept ImportError:\n    print('ImportError')\n"
            "from course_lib.cli import main\nprint(main(['serve']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.stdout.split() == ["True", "ImportError", "1"], out.stderr
    assert "serve needs FastAPI and uvicorn" in out.stderr and out.stderr.count("\n") == 1


# the checkers

def _parse_sse_another_way(text: str) -> list:
    "Line by line, as a browser's EventSource does: a data buffer flushed at each blank line."
    chunks, data = [], None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data is not None:
                if data == "[DONE]":
                    return chunks
                chunks.append(json.loads(data))
            data = None
        elif line.startswith("data:"):
            value = line[5:][1:] if line[5:6] == " " else line[5:]
            data = value if data is None else data + "\n" + value
    raise ValueError("no [DONE]")


def test_checkers_pass_copies_of_the_reference_and_another_answer():
    assert check.sse_event(source_copy(server, "sse_event"))
    assert check.sampling_from_request(source_copy(server, "_number", "sampling_from_request")[1])
    assert check.parse_sse(source_copy(checks_server, "_parse_sse"))
    assert check.parse_sse(_parse_sse_another_way)


def test_checkers_refuse_the_library_and_the_openai_decoder():
    assert refused(check.sse_event(server.sse_event), "sse_event")
    assert refused(check.sampling_from_request(server.sampling_from_request), "sampling_from_request")
    assert refused(check.parse_sse(checks_server._parse_sse), "_parse_sse")

    def borrow_openai(text):
        from openai._streaming import SSEDecoder
        decoder, chunks = SSEDecoder(), []
        for line in text.splitlines():
            event = decoder.decode(line)
            if event is not None:
                if event.data == "[DONE]":
                    return chunks
                chunks.append(json.loads(event.data))
        raise ValueError("cut")
    assert refused(check.parse_sse(borrow_openai), "SSEDecoder")

    def borrow_helper(body):
        t = server._number(body, "temperature", 1.0, 0.0, 2.0)
        return {"method": "greedy"} if t == 0 else {"method": "temperature", "temperature": t, "seed": body.get("seed")}
    assert refused(check.sampling_from_request(borrow_helper), "_number")


def test_checkers_name_the_usual_mistakes():
    indented = check.sse_event(lambda d: f"data: {d if isinstance(d, str) else json.dumps(d, indent=2)}\n\n")
    assert not indented and "line break" in str(indented)
    quoted = check.sse_event(lambda d: f"data: {json.dumps(d)}\n\n")
    assert not quoted and "[DONE]" in str(quoted) and "failed 1 of 5" in str(quoted)
    no_blank = check.sse_event(lambda d: f"data: {d if isinstance(d, str) else json.dumps(d)}\n")
    assert not no_blank and "blank line" in str(no_blank)

    def top_p_always(body):
        t = body.get("temperature")
        t = 1.0 if t is None else float(t)
        if not 0 <= t <= 2 or (body.get("top_p") is not None and not 0 < body["top_p"] <= 1):
            raise ValueError("range")
        if isinstance(body.get("seed"), int) and body["seed"] < 0:
            raise ValueError("seed")
        if t == 0:
            return {"method": "greedy"}
        if body.get("top_p") is not None:
            return {"method": "top_p", "temperature": t, "top_p": body["top_p"], "seed": body.get("seed")}
        return {"method": "temperature", "temperature": t, "seed": body.get("seed")}
    wrong = check.sampling_from_request(top_p_always)
    assert not wrong and "top_p = 1 keeps every token" in str(wrong) and "failed 1 of 12" in str(wrong)
    no_checks = check.sampling_from_request(lambda b: {"method": "greedy"} if b.get("temperature") == 0 else
                                            {"method": "temperature", "temperature": float(b.get("temperature") or 1.0),
                                             "seed": b.get("seed")} if b.get("top_p") is None else
                                            {"method": "top_p", "temperature": float(b.get("temperature") or 1.0),
                                             "top_p": b["top_p"], "seed": b.get("seed")})
    assert not no_checks and "should raise ValueError" in str(no_checks)

    def no_comments(text):                          # splits at blank lines but takes every line as data
        chunks = []
        for event in text.replace("\r\n", "\n").split("\n\n"):
            if not event:
                continue
            payload = "\n".join(line.split(":", 1)[1].strip() for line in event.split("\n"))
            if payload == "[DONE]":
                return chunks
            chunks.append(json.loads(payload))
        raise ValueError("cut")
    assert not check.parse_sse(no_comments) and "comment" in str(check.parse_sse(no_comments))

    def ignores_the_cut(text):
        return _parse_sse_another_way(text + "data: [DONE]\n\n")
    lenient = check.parse_sse(ignores_the_cut)
    assert not lenient and "should raise ValueError" in str(lenient) and "failed 1 of 8" in str(lenient)


# the command line

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_an_openai_client():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "course_lib", "serve", "--port", str(port), "--max-seq-len", "256",
                             "--max-batch-size", "4"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 90 s"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
        assert r.choices[0].text.startswith(" Paris") and r.usage.completion_tokens == 5
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "serving 'smollm2' at http://127.0.0.1:" in err


@pytest.mark.parametrize("args, message", [(["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
                                           (["--port", "70000"], "--port must be in 0..65535")])
def test_serve_bad_options_are_one_line(args, message, capsys):
    from course_lib.cli import main
    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_create_app_refuses_what_it_cannot_serve(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(TypeError, match="tokenizer must have encode"):
        create_app(model, "not a tokenizer")
    with pytest.raises(TypeError, match="course_lib Transformer"):
        create_app("not a model", tokenizer)
    with pytest.raises(ValueError, match="model_id"):
        create_app(model, tokenizer, model_id="")
