"""`w2s eval --engine openai` against a fake OpenAI-compatible server (no vLLM needed)."""

import json
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from w2s_jax import cli, eval_engine
from w2s_jax.eval_engine import EngineError
from w2s_jax.evaluate import EvalSettings, run_eval
from w2s_jax.prompts import EVAL_SYSTEM_PROMPT, prompt_text

MAX_NEW = 32
EOS = 2  # <|im_end|> of the tiny tokenizer
QUESTIONS = [f"Tom has {i} apples and buys {i + 3} more. How many apples?" for i in range(4)]
GOLDS = ["7", "9", "11", "13"]
# canned answers: right, wrong, no answer, and one cut at --max-new-tokens
ANSWERS = [
    "So 3 + 4 = \\boxed{7}.",
    "He has \\boxed{8} apples.",
    "I do not know.",
    "Counting one by one: one, two, three, four, five, six, seven, eight, nine, ten",
]


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 answering each prompt with the canned
    answer of the question in it; it records every request (path, JSON body)."""

    def __init__(self, answers: dict[str, tuple[str, int, str]], *, model="served", body=None):
        self.requests, self.answers, self.model, self.body = [], answers, model, body
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802
                server.requests.append((self.path, None))
                self._send(json.dumps({"data": [{"id": server.model}]}).encode())

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                self._send(server.body if server.body is not None else server.answer(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> bytes:
        question = next(q for q in self.answers if q in body["prompt"])
        text, tokens, finish = self.answers[question]
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return json.dumps({"choices": [choice], "usage": {"completion_tokens": tokens}}).encode()

    def completions(self) -> list[dict]:
        return [body for path, body in self.requests if path == "/v1/completions"]


@pytest.fixture(scope="module")
def canned(tiny_qwen2_dir):
    """Per question: the token ids in-process decoding would produce for its canned answer
    (ending in EOS, or cut at MAX_NEW), and the server's (text, tokens, finish_reason)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    ids, served = {}, {}
    for question, answer in zip(QUESTIONS, ANSWERS, strict=True):
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        tokens = tokens[:MAX_NEW] if len(tokens) >= MAX_NEW else [*tokens, EOS]
        finish = "length" if tokens[-1] != EOS else "stop"
        ids[question] = tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        served[question] = (text, len(tokens), finish)
    assert [f for _, _, f in served.values()] == ["stop"] * 3 + ["length"]
    return ids, served


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"id": f"q{i}", "question": q, "answer": f"#### {g}"}
        for i, (q, g) in enumerate(zip(QUESTIONS, GOLDS, strict=True))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _settings(model_dir, data, out, **kw):
    return EvalSettings(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        max_new_tokens=MAX_NEW,
        batch_size=2,
        progress=False,
        **kw,
    )


def _in_process(monkeypatch, settings, ids):
    """run_eval in process, `generate` answering each prompt with the canned token ids."""
    from transformers import AutoTokenizer

    import w2s_jax.generate

    tokenizer = AutoTokenizer.from_pretrained(settings.model)

    def fake_generate(model, prompts, **kwargs):
        texts = [tokenizer.decode(p) for p in prompts]
        rows = [next(t for q, t in ids.items() if q in text) for text in texts]
        tokens = np.full((len(rows), MAX_NEW), EOS, np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        lengths = np.asarray([len(r) for r in rows], np.int32)
        return w2s_jax.generate.GenerationResult(tokens, lengths)

    monkeypatch.setattr(w2s_jax.generate, "generate", fake_generate)
    return run_eval(settings)


def test_engine_rows_equal_in_process_rows(canned, data, tmp_path, tiny_qwen2_dir, monkeypatch):
    ids, served = canned
    server = FakeServer(served)
    engine_run = _settings(
        tiny_qwen2_dir, data, tmp_path / "engine", engine="openai", endpoint=server.endpoint
    )
    summary = run_eval(engine_run)
    reference = _in_process(monkeypatch, _settings(tiny_qwen2_dir, data, tmp_path / "ref"), ids)

    engine_rows = (tmp_path / "engine" / "predictions.jsonl").read_text()
    assert engine_rows == (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert [json.loads(r)["correct"] for r in engine_rows.splitlines()] == [1, 0, 0, 0]
    assert json.loads(engine_rows.splitlines()[3])["hit_max_new_tokens"] is True
    without = lambda s: {k: v for k, v in s.items() if k != "settings"}  # noqa: E731
    assert without(summary) == without(reference)
    run = json.loads((tmp_path / "engine" / "run.json").read_text())
    assert (run["engine"], run["endpoint"], run["engine_model"]) == (
        "openai",
        server.endpoint,
        "served",
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    requests = server.completions()
    assert sorted(r["prompt"] for r in requests) == sorted(
        prompt_text(tokenizer, q, style="chat", system_prompt=EVAL_SYSTEM_PROMPT) for q in QUESTIONS
    )
    for request in requests:
        assert request["model"] == "served"
        assert (request["temperature"], request["max_tokens"], request["n"]) == (0.0, MAX_NEW, 1)
        assert {"<|endoftext|>", "<|im_end|>"} <= set(request["stop"])
        assert EOS in request["stop_token_ids"]
        assert request["add_special_tokens"] is False


def test_resume_asks_only_for_unfinished_questions(canned, data, tmp_path, tiny_qwen2_dir):
    _, served = canned
    server = FakeServer(served)
    settings = _settings(
        tiny_qwen2_dir, data, tmp_path / "run", engine="openai", endpoint=server.endpoint
    )
    run_eval(settings)
    first = (tmp_path / "run" / "predictions.jsonl").read_text()
    shards = sorted((tmp_path / "run" / "shards").iterdir())
    lost = {json.loads(line)["id"] for line in shards[-1].read_text().splitlines()}
    shards[-1].unlink()  # as if killed before the last batch was written

    other = FakeServer(served)  # a restarted server on another port
    run_eval(replace(settings, endpoint=other.endpoint))
    asked = {q for body in other.completions() for q in QUESTIONS if q in body["prompt"]}
    assert asked == {QUESTIONS[int(i[1:])] for i in lost} and len(other.completions()) == 2
    assert (tmp_path / "run" / "predictions.jsonl").read_text() == first

    run_eval(replace(settings, endpoint=other.endpoint))  # finished: no request at all
    assert len(other.completions()) == 2


def test_sampled_rows_each_send_their_own_seed(canned, data, tmp_path, tiny_qwen2_dir):
    _, served = canned
    server = FakeServer(served)
    settings = _settings(
        tiny_qwen2_dir,
        data,
        tmp_path / "run",
        engine="openai",
        endpoint=server.endpoint,
        samples=2,
        temperature=0.7,
        top_p=0.9,
        seed=3,
    )
    summary = run_eval(settings)
    assert summary["samples"] == 2 and summary["pass_at_k"]["1"] == 0.25
    requests = server.completions()
    assert {(r["temperature"], r["top_p"]) for r in requests} == {(0.7, 0.9)}
    expected = {eval_engine.row_seed(3, f"q{i}", j) for i in range(4) for j in range(2)}
    assert {r["seed"] for r in requests} == expected and len(expected) == 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_is_one_clear_error(data, tmp_path, tiny_qwen2_dir, monkeypatch):
    sleeps = []
    monkeypatch.setattr(eval_engine.time, "sleep", sleeps.append)
    endpoint = f"http://127.0.0.1:{_free_port()}/v1"
    args = ["eval", "--model", str(tiny_qwen2_dir), "--data", str(data), "--no-progress"]
    args += ["--out", str(tmp_path / "run"), "--engine", "openai", "--endpoint", endpoint]
    with pytest.raises(SystemExit, match=rf"error: engine {endpoint}/models unreachable"):
        cli.main(args)
    assert sleeps == [0.5, 1.0, 2.0, 4.0]  # retried with backoff
    assert not (tmp_path / "run" / "shards").exists()


def test_malformed_answer_names_the_endpoint(canned, data, tmp_path, tiny_qwen2_dir):
    server = FakeServer(canned[1], body=b"<html>not json</html>")
    settings = _settings(
        tiny_qwen2_dir, data, tmp_path / "run", engine="openai", endpoint=server.endpoint
    )
    with pytest.raises(EngineError, match=rf"engine {server.endpoint}/completions .*malformed"):
        run_eval(settings)
    assert not list((tmp_path / "run" / "shards").glob("*"))
    server.body = json.dumps({"choices": []}).encode()
    with pytest.raises(EngineError, match=r"answered no choices\[0\].text"):
        run_eval(settings)
    with pytest.raises(EngineError, match="does not serve 'other'"):
        run_eval(replace(settings, engine_model="other"))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"engine": "openai"}, "needs --endpoint"),
        ({"endpoint": "http://localhost:1/v1"}, "apply to --engine openai"),
        ({"engine": "openai", "endpoint": "http://x/v1", "mesh": "data=2"}, "--mesh applies"),
        (
            {
                "engine": "openai",
                "endpoint": "http://x/v1",
                "decoding": "contrastive",
                "amateur": "A",
            },
            "contrastive runs in process only",
        ),
    ],
)
def test_engine_settings_that_cannot_work(kw, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(model="M", data="D", **kw)
