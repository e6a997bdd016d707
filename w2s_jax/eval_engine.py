"""`w2s eval --engine openai`: decode with an OpenAI-compatible server (vLLM, ...).

Optional, and not part of CI: nothing here needs vLLM, only the standard library.
The server serves the folder of `--model` (e.g. `vllm serve DIR`); `w2s_jax` builds
each prompt exactly as in process (`prompts.prompt_text`, with the tokenizer of
`--model`) and posts it as text to `ENDPOINT/completions` (not chat: the template is
ours), one request per (question, sample), `--batch-size` of them in flight:

- temperature (0 for greedy), top_p, max_tokens = --max-new-tokens, n = 1;
- seed: a sampled row's own (`row_seed`: the run's seed, the question id, the sample
  index), so a resumed run asks what an uninterrupted one would;
- stop: the run's stop ids decoded to text, and `stop_token_ids` (and, for a chat
  prompt that already holds its special tokens, `add_special_tokens: false`): vLLM
  fields that other servers ignore.

The answers come back as (text, completion tokens, finish_reason == "length") and
are graded by `w2s_jax.evaluate` as in-process ones are. Connection errors and 5xx
answers are retried with backoff; then, or on a malformed answer, `EngineError`
names the endpoint.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

from w2s_jax.prompts import prompt_text

ENGINES = ("openai",)
IN_PROCESS_ONLY = ("lora", "mesh")  # settings the served model cannot honour


class EngineError(ValueError):
    """The engine's endpoint is unreachable or answered something unusable."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """An OpenAI-compatible endpoint (base URL ending in /v1) and the model it serves."""

    endpoint: str
    model: str = ""
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 3600.0

    def call(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST JSON to ENDPOINT/path; the decoded JSON object."""
        url = f"{self.endpoint}/{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == self.retries:
                    detail = exc.read().decode(errors="replace")[:500]
                    raise EngineError(f"engine {url} answered HTTP {exc.code}: {detail}") from None
            except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise EngineError(
                        f"engine {url} unreachable after {self.retries + 1} tries ({reason}); "
                        "is the server running (e.g. `vllm serve DIR`)?"
                    ) from None
            time.sleep(self.backoff_s * 2**attempt)
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(f"engine {url} answered malformed JSON ({exc})") from None
        if not isinstance(answer, dict):
            raise EngineError(f"engine {url} answered {type(answer).__name__}, not a JSON object")
        return answer


def check_settings(settings, decoding: str) -> None:
    """ValueError naming the flag for an engine setting that cannot work."""
    if settings.engine is None:
        if settings.endpoint or settings.engine_model:
            raise ValueError("--endpoint and --engine-model apply to --engine openai")
        return
    if not (settings.endpoint or "").startswith(("http://", "https://")):
        raise ValueError("--engine openai needs --endpoint http://HOST:PORT/v1")
    if decoding == "contrastive":
        raise ValueError("--decoding contrastive runs in process only; drop --engine")
    for name in IN_PROCESS_ONLY:
        if getattr(settings, name):
            raise ValueError(
                f"--{name} applies to in-process decoding, not --engine (merge a LoRA "
                "checkpoint with `w2s export` and serve that folder)"
            )


def connect(settings) -> Engine:
    """The engine of `settings`, after asking ENDPOINT/models which model it serves:
    --engine-model, else the one named like --model, else the only one listed."""
    engine = Engine(settings.endpoint.rstrip("/"))
    listed = engine.call("models").get("data")
    if not isinstance(listed, list) or not all(isinstance(m, dict) for m in listed):
        raise EngineError(f"engine {engine.endpoint}/models answered no model list")
    names = [str(m.get("id")) for m in listed]
    wanted = settings.engine_model or (settings.model if settings.model in names else None)
    if wanted is None and len(names) == 1:
        wanted = names[0]
    if wanted not in names:
        raise EngineError(
            f"engine {engine.endpoint} serves {names}; name one with --engine-model"
            if wanted is None
            else f"engine {engine.endpoint} does not serve {wanted!r} (it serves {names})"
        )
    return dataclasses.replace(engine, model=wanted)


def row_seed(seed: int, question_id: str, sample: int) -> int:
    """The request seed of one (question, sample) row."""
    return zlib.crc32(f"{seed}/{question_id}/{sample}".encode())


def request_body(engine: Engine, prompt: str, seed: int, ctx: dict) -> dict:
    """The /completions request of one row (ctx: `w2s_jax.evaluate`'s run context)."""
    settings, tokenizer, eos = ctx["settings"], ctx["tokenizer"], ctx["eos"]
    stops = [s for s in dict.fromkeys(tokenizer.decode([i]) for i in eos) if s]
    return {
        "model": engine.model,
        "prompt": prompt,
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": 1.0 if settings.top_p is None else settings.top_p,
        "n": 1,
        "seed": seed,
        "stop": stops,
        "stop_token_ids": list(eos),
        "add_special_tokens": settings.prompt_style == "plain",
    }


def _completion(engine: Engine, body: dict, tokenizer) -> tuple[str, int, bool]:
    answer = engine.call("completions", body)
    try:
        choice = answer["choices"][0]
        text, finish = str(choice["text"]), choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise EngineError(
            f"engine {engine.endpoint}/completions answered no choices[0].text"
        ) from None
    usage = answer.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(count, int):
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, count, finish == "length"


def complete(engine: Engine, batch: list, ctx: dict) -> list[tuple[str, int, bool]]:
    """(text, completion tokens, hit max_tokens) of each (question, sample) of `batch`,
    all requests of the batch in flight at once."""
    settings, tokenizer = ctx["settings"], ctx["tokenizer"]
    bodies = [
        request_body(
            engine,
            prompt_text(
                tokenizer,
                q.question,
                style=settings.prompt_style,
                system_prompt=settings.system_prompt,
            ),
            row_seed(settings.seed, q.id, j),
            ctx,
        )
        for q, j in batch
    ]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: _completion(engine, body, tokenizer), bodies))
