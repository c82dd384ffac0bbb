"""Gold judges: VADER, MiniLM embedding similarity, an OpenAI-compatible LLM judge (against a loopback stub)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oodpl.errors import UserError
from oodpl.judges import (
    EmbeddingJudge,
    Judge,
    LLMJudge,
    VaderJudge,
    _chat_url,
    _load_encoder,
    compare,
    make_judge,
    parse_rating,
)


# ---------------------------------------------------------------------------------------------------- VADER
def test_vader_scores_response_sentiment():
    j = VaderJudge()
    assert isinstance(j, Judge) and j.name == "vader"
    pos, neg = j.score(
        ["The movie was", "The movie was"],
        ["absolutely wonderful, I loved it and had a great time!", "terrible, awful and boring. I hated it."],
    )
    assert pos > 0.5
    assert neg < -0.5


def test_vader_ignores_the_prompt():
    j = VaderJudge()
    a, b = j.score(["I hate this awful, horrible film.", "Neutral prompt"], ["It was great, I love it!"] * 2)
    assert a == b > 0.5
    with pytest.raises(ValueError):
        j.score(["one prompt"], ["two", "responses"])


# ------------------------------------------------------------------------------------------------ embedding
@pytest.fixture(scope="module")
def emb():
    return EmbeddingJudge()


def test_embedding_identical_text_is_one_unrelated_is_lower(emb):
    ref = "Paris is the capital of France."
    s_same, s_para, s_unrel = emb.score(
        ["q"] * 3,
        [ref, "The capital city of France is Paris.", "Photosynthesis converts sunlight into chemical energy."],
        [ref] * 3,
    )
    assert s_same == pytest.approx(1.0, abs=1e-5)
    assert s_unrel < 0.3
    assert s_unrel < s_para < s_same


def test_embedding_is_unit_norm_and_padding_invariant(emb):
    texts = ["short", "a much longer sentence with many more tokens than the first one has in it", "mid length text"]
    e = emb.embed(texts)
    assert e.shape == (3, 384)
    assert e.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # mean pooling must ignore padding: one-at-a-time equals padded batches
    one = EmbeddingJudge(batch_size=1)
    refs = ["a short reference", "another, rather longer, reference answer about something else entirely", "x"]
    assert one.score(["q"] * 3, texts, refs) == pytest.approx(emb.score(["q"] * 3, texts, refs), abs=1e-5)


def test_embedding_model_is_cached_per_process(emb):
    a = _load_encoder(emb.model_dir)
    b = _load_encoder(EmbeddingJudge().model_dir)
    assert a[1] is b[1]


def test_embedding_needs_references(emb, tmp_path):
    with pytest.raises(UserError, match="reference"):
        emb.score(["q"], ["answer"])
    with pytest.raises(UserError, match="reference"):
        emb.score(["q", "q"], ["a", "b"], ["ref", None])
    assert emb.score([], [], []) == []
    with pytest.raises(UserError, match="config.json"):
        EmbeddingJudge(model_dir=tmp_path).score(["q"], ["a"], ["r"])


# -------------------------------------------------------------------------------------------------- LLM judge
class _Stub:
    """A loopback OpenAI-compatible server; `replies` is a list of (status, body) served in order (last repeats)."""

    def __init__(self, replies, delay=0.0):
        self.replies = list(replies)
        self.delay = delay
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                if stub.delay:
                    time.sleep(stub.delay)
                i = min(len(stub.requests) - 1, len(stub.replies) - 1)
                status, payload = stub.replies[i]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _chat(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llm_judge_parses_ratings_and_sends_a_chat_request(monkeypatch):
    monkeypatch.setenv("OODPL_TEST_KEY", "sk-test-123")
    with _Stub([(200, _chat("7")), (200, _chat("Rating: 9/10"))]) as stub:
        j = LLMJudge(stub.url, "judge-model", api_key_env="OODPL_TEST_KEY", retry_backoff=0)
        assert isinstance(j, Judge) and j.name == "llm"
        scores = j.score(["What is 2+2?", "Capital of France?"], ["4", "Paris"], [None, "Paris is the capital."])
    assert scores == [7.0, 9.0]
    assert [r["path"] for r in stub.requests] == ["/v1/chat/completions"] * 2
    first, second = stub.requests
    assert first["headers"]["Authorization"] == "Bearer sk-test-123"
    assert first["body"]["model"] == "judge-model"
    user0 = first["body"]["messages"][-1]["content"]
    assert "What is 2+2?" in user0 and "4" in user0 and "Reference" not in user0
    user1 = second["body"]["messages"][-1]["content"]
    assert "Paris is the capital." in user1 and "Reference" in user1


def test_llm_judge_retries_transient_failures_then_succeeds():
    with _Stub([(500, "oops"), (200, "not json at all"), (200, _chat("6"))]) as stub:
        j = LLMJudge(stub.url + "/v1", "m", api_key_env="OODPL_NO_SUCH_KEY", max_retries=2, retry_backoff=0)
        assert j.score(["p"], ["r"]) == [6.0]
    assert len(stub.requests) == 3
    assert "Authorization" not in stub.requests[0]["headers"]


@pytest.mark.parametrize(
    "reply, what",
    [((200, "{malformed json"), "not an OpenAI chat completion"), ((200, _chat("I cannot rate this.")), "no rating")],
)
def test_llm_judge_malformed_reply_is_a_user_error_after_bounded_retries(reply, what):
    with _Stub([reply]) as stub:
        j = LLMJudge(stub.url, "m", max_retries=2, retry_backoff=0)
        with pytest.raises(UserError) as ei:
            j.score(["p"], ["r"])
    msg = str(ei.value)
    assert stub.url in msg and what in msg and "3 attempt" in msg and "\n" not in msg
    assert len(stub.requests) == 3


def test_llm_judge_client_error_fails_without_retry():
    with _Stub([(401, {"error": "bad key"})]) as stub:
        j = LLMJudge(stub.url, "m", max_retries=5, retry_backoff=0)
        with pytest.raises(UserError, match="HTTP 401"):
            j.score(["p"], ["r"])
    assert len(stub.requests) == 1


def test_llm_judge_server_down_is_a_user_error():
    url = f"http://127.0.0.1:{_free_port()}"
    j = LLMJudge(url, "m", max_retries=1, retry_backoff=0, timeout=2)
    with pytest.raises(UserError) as ei:
        j.score(["p"], ["r"])
    msg = str(ei.value)
    assert url in msg and "cannot connect" in msg and "2 attempt" in msg


def test_llm_judge_timeout_is_a_user_error():
    with _Stub([(200, _chat("5"))], delay=1.0) as stub:
        j = LLMJudge(stub.url, "m", timeout=0.2, max_retries=0, retry_backoff=0)
        with pytest.raises(UserError, match="no reply within"):
            j.score(["p"], ["r"])


def test_llm_judge_rejects_non_http_urls():
    with pytest.raises(UserError, match="http"):
        LLMJudge("file:///etc/passwd", "m")
    with pytest.raises(UserError):
        LLMJudge("http://127.0.0.1:1", "")


@pytest.mark.parametrize(
    "text, value",
    [("7", 7.0), ("Rating: 8/10", 8.0), ("10", 10.0), ("7.5", 7.5), (" 1 ", 1.0),
     ("11", None), ("0", None), ("-3", None), ("none", None), ("", None)],
)
def test_parse_rating(text, value):
    assert parse_rating(text) == value


def test_chat_url_normalisation():
    assert _chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert _chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert _chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


# ---------------------------------------------------------------------------------------------- factory, compare
def test_make_judge():
    assert isinstance(make_judge("auto", "sentiment"), VaderJudge)
    assert isinstance(make_judge("auto", "knowledge"), EmbeddingJudge)
    assert isinstance(make_judge("vader", None), VaderJudge)
    j = make_judge("llm", "knowledge", llm_url="http://127.0.0.1:9/v1", llm_model="m")
    assert isinstance(j, LLMJudge) and j.url == "http://127.0.0.1:9/v1/chat/completions"
    with pytest.raises(UserError, match="unknown judge"):
        make_judge("gpt4", "sentiment")
    with pytest.raises(UserError, match="no automatic gold judge"):
        make_judge("auto", "dialogue")
    with pytest.raises(UserError, match="URL"):
        make_judge("llm", "sentiment")


class _TableJudge:
    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompts, responses, references=None):
        return [self.table[r] for r in responses]


def test_compare_wins_ties_losses():
    j = _TableJudge({"good": 0.9, "bad": 0.1, "same": 0.5, "same2": 0.5 + 1e-12})
    out = compare(j, ["p1", "p2", "p3"], ["good", "bad", "same"], ["bad", "good", "same2"])
    assert out == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        compare(j, ["p"], ["good"], ["bad", "good"])
