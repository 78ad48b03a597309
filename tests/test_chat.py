"""Chat-aware calibration and the chat evaluation's pieces (tiny models; no llama.cpp here)."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from clitools import run_cli
from gguf_fixtures import finish_gguf

from asvd2gguf import chat, chateval
from asvd2gguf.chateval import Question, is_correct, normalise, numbers
from asvd2gguf.errors import UserError
from asvd2gguf.text import calibration_windows

TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<{{ m['role'] }}> {{ m['content'] }}\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_chat_src(tiny_models, cache_dir):
    """The tiny llama as a Source whose tokenizer has a simple chat template."""
    from asvd2gguf.source import load_source

    src = load_source(str(tiny_models["llama"]), cache_dir)
    src.tokenizer.chat_template = TEMPLATE
    return src


def test_text_windows_start_with_bos_as_llama_cpp_chunks_do(tok, tokenizer_dir, calib_text):
    """A vocabulary that adds BOS (the tiny one, like Gemma 3's) gets BOS in place of each text
    window's first token, as llama-imatrix and llama-perplexity cut chunks; the rest of the window
    is the text's tokens at the seeded start. Without add_bos (like SmolLM2's) the windows are the
    plain text, BOS nowhere."""
    from transformers import AutoTokenizer

    from asvd2gguf.text import adds_bos, tokenize

    w = calibration_windows(tok, str(calib_text), 5, 32, 7)
    assert adds_bos(tok) and (w[:, 0] == tok.bos_token_id).all() and not (w[:, 1:] == tok.bos_token_id).any()
    plain_tok = AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=False)
    assert not adds_bos(plain_tok) and plain_tok.bos_token_id == tok.bos_token_id
    p = calibration_windows(plain_tok, str(calib_text), 5, 32, 7)
    assert not (p == tok.bos_token_id).any()
    ids = tokenize(plain_tok, calib_text.read_text())

    def in_text(row: torch.Tensor) -> bool:
        return any(torch.equal(ids[i:i + len(row)], row) for i in range(len(ids) - len(row) + 1))

    assert all(in_text(row) for row in p) and all(in_text(row[1:]) for row in w)  # BOS aside, the text


# ---------------------------------------------------------------- rendering and JSONL

def test_render_with_template(tok):
    msgs = [{"role": "user", "content": "the city"}, {"role": "assistant", "content": "a river"}]
    assert chat.render(tok, TEMPLATE, msgs) == "<s><user> the city\n<assistant> a river\n"
    assert chat.render(tok, TEMPLATE, msgs[:1], add_generation_prompt=True) == "<s><user> the city\n<assistant> "


def test_encode_puts_one_bos_in_front(tok):
    with_bos = chat.encode(tok, chat.render(tok, TEMPLATE, [{"role": "user", "content": "the war"}]))
    without = chat.encode(tok, "<user> the war\n")  # template that does not write BOS: the vocabulary adds it
    assert with_bos[0] == tok.bos_token_id and with_bos[1] != tok.bos_token_id
    assert without[0] == tok.bos_token_id and without[1] != tok.bos_token_id


def test_template_error_is_one_line(tok):
    bad = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match="chat template failed.*roles must alternate"):
        chat.render(tok, bad, [{"role": "user", "content": "x"}])


def test_chat_template_from_gguf_key(tok, tmp_path):
    """A tokenizer without a template falls back to the GGUF's tokenizer.chat_template."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_chat_template(TEMPLATE)
    w.add_tensor("x", np.zeros(4, np.float32))
    finish_gguf(w)
    assert tok.chat_template is None
    assert chat.chat_template(tok, None) is None
    assert chat.chat_template(tok, path) == TEMPLATE


def test_parse_conversations(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n\n'
                 '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]}\n')
    convs = chat.parse_conversations(p)
    assert [len(c) for c in convs] == [2, 2]
    assert convs[1][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("line,fragment", [
    ('{"messages": [', "line 2: not valid JSON"),
    ('{"msgs": []}', "line 2: expected"),
    ('[1, 2]', "line 2: expected"),
    ('{"messages": []}', "line 2: expected"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: each message needs a role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 2: each message needs a role"),
    ('{"messages": [{"role": "system", "content": "x"}]}', "line 2: the conversation has no user turn"),
])
def test_parse_conversations_errors(tmp_path, line, fragment):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        chat.parse_conversations(p)
    assert fragment in str(e.value) and "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_parse_conversations_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no conversations"):
        chat.parse_conversations(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="not found"):
        chat.parse_conversations(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- data files

def test_prompt_sets_are_disjoint_and_varied():
    cal, held = chat.load_prompts("calibration"), chat.load_prompts("heldout")
    assert len(cal) >= 100 and len(held) >= 30
    assert not set(cal) & set(held) and len(set(cal)) == len(cal) and len(set(held)) == len(held)
    assert sum(any(ord(ch) > 127 for ch in p) for p in cal) >= 5  # several languages
    assert sum("python" in p.lower() or "function" in p.lower() for p in cal) >= 5  # code
    asked = {q.q for q in chateval.load_questions()}
    assert not (set(cal) | set(held)) & asked  # the question set stays unseen by calibration


def test_question_file_format():
    qs = chateval.load_questions()
    assert len(qs) >= 100
    assert {q.kind for q in qs} == set(chateval.KINDS)
    assert len({q.q for q in qs}) == len(qs)
    for q in qs:
        assert q.q.strip() and q.answers and all(normalise(a) for a in q.answers)
        if q.kind in ("text", "short"):  # an echo of the question must not count as an answer
            assert not any(f" {normalise(a)} " in f" {normalise(q.q)} " for a in q.answers), q
        if q.kind == "number":
            assert all(numbers(a) and numbers(a)[0] not in numbers(q.q) for a in q.answers), q


def test_question_file_errors(tmp_path):
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"questions": [{"q": "x?", "a": [], "kind": "text"}]}))
    with pytest.raises(UserError, match="entry 0 needs"):
        chateval.load_questions(p)
    p.write_text(json.dumps({"questions": [{"q": "x?", "a": ["y"], "kind": "vibes"}]}))
    with pytest.raises(UserError, match="entry 0 needs"):
        chateval.load_questions(p)
    p.write_text(json.dumps({"questions": []}))
    with pytest.raises(UserError, match="no questions"):
        chateval.load_questions(p)


# ---------------------------------------------------------------- answer matching

def test_normalise():
    assert normalise("  The capital is BRASÍLIA!  ") == "the capital is brasilia"
    assert normalise("It costs 1,000 dollars, i.e. 3.5 each.") == "it costs 1000 dollars i e 3.5 each"
    assert normalise("'Twenty-four.'") == "twenty four"


def test_numbers():
    assert numbers("7 times 8 is 56.") == [7.0, 8.0, 56.0]
    assert numbers("There are twenty-four hours in one day") == [24.0, 1.0]
    assert numbers("one hundred and twenty") == [120.0]
    assert numbers("ten and twenty") == [10.0, 20.0]  # 'and' joins only after hundred / thousand
    assert numbers("a thousand meters") == [1000.0]
    assert numbers("It is 1,000 grams, not one") == [1000.0]  # digits present: words ignored


@pytest.mark.parametrize("q,reply,ok", [
    (Question("What is the capital of France?", ("Paris",), "text"), "The capital of France is Paris.", True),
    (Question("What is the capital of France?", ("Paris",), "text"), "La femme au pays, la femme", False),
    (Question("What is the capital of France?", ("Paris",), "text"), "Parisian food is good", False),
    (Question("Who painted the Mona Lisa?", ("Leonardo", "da Vinci"), "text"), "Da Vinci painted it.", True),
    (Question("What is 7 times 8?", ("56",), "number"), "7 times 8 equals 56.", True),
    (Question("What is 7 times 8?", ("56",), "number"), "56 is 7 times 8", True),
    (Question("What is 7 times 8?", ("56",), "number"), "7 times 8 is 54, not 56", False),
    (Question("What is 7 times 8?", ("56",), "number"), "7 times 8", False),
    (Question("How many days are in a week?", ("7",), "number"), "There are seven days in a week.", True),
    (Question("Is the sun a star? Reply with a single word.", ("yes",), "short"), "Yes.", True),
    (Question("Is the sun a star? Reply with a single word.", ("yes",), "short"), "Yes, the sun is a star.", True),
    (Question("Is the sun a star? Reply with a single word.", ("yes",), "short"), "No, it is not.", False),
    (Question("Is the sun a star? Reply with a single word.", ("yes",), "short"),
     "The sun is a star, yes, and it is the closest one to us.", False),  # 9 words: not short
    (Question("Reply with only the number: days in a week?", ("7", "seven"), "short"), "Seven", True),
])
def test_is_correct(q, reply, ok):
    assert is_correct(q, reply) is ok


# ---------------------------------------------------------------- sampler and generation

def test_sample_next_follows_the_filters():
    logits = torch.full((3, 100), -10.0)
    logits[:, 5] = 10.0  # one token holds all mass: top-p and min-p leave only it
    g = torch.Generator().manual_seed(0)
    assert chat.sample_next(logits, g).tolist() == [5, 5, 5]
    logits = torch.zeros(2, 100)
    logits[:, :3] = 5.0  # three equal candidates; min-p drops the rest (e^-5 / 1 < 0.05)
    draws = torch.stack([chat.sample_next(logits, g) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    assert chat.sample_next(torch.tensor([[0.0, 3.0, 1.0]]), None).tolist() == [1]


def test_generate_replies_is_seeded(tiny_chat_src):
    src = tiny_chat_src
    convs = [[{"role": "user", "content": "the river"}], [{"role": "user", "content": "the war was"}]]
    a = chat.generate_replies(src.model, src.tokenizer, TEMPLATE, convs, seed=3, max_new=12)
    b = chat.generate_replies(src.model, src.tokenizer, TEMPLATE, convs, seed=3, max_new=12)
    assert a == b and [c[:-1] for c in a] == convs and all(c[-1]["role"] == "assistant" for c in a)
    # left padding must not change a reply: the short prompt alone gives the same greedy reply
    g2 = chat.generate_replies(src.model, src.tokenizer, TEMPLATE, convs, seed=0, max_new=12, greedy=True)
    g1 = chat.generate_replies(src.model, src.tokenizer, TEMPLATE, convs[:1], seed=0, max_new=12, greedy=True)
    assert g2[0] == g1[0]


# Gemma-style: turns end with a special token that is not the vocabulary's EOS (Gemma 3 GGUFs
# say EOS = <eos> while turns end with <end_of_turn>). The tiny vocabulary's byte token <0x41> is
# made special to play <end_of_turn>: it keeps its id (68), inside the tiny model's vocabulary.
TURN_END = "<0x41>"
TURN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}" + TURN_END + "\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture
def turn_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": [TURN_END]})
    assert t.convert_tokens_to_ids(TURN_END) < len(tok) and t.eos_token_id != t.convert_tokens_to_ids(TURN_END)
    return t


def test_turn_end_ids(turn_tok, tok):
    end = turn_tok.convert_tokens_to_ids(TURN_END)
    assert chat.turn_end_ids(turn_tok, TURN_TEMPLATE) == [end]
    assert chat.turn_end_ids(tok, TEMPLATE) == []  # "\n" after a reply: no special token, EOS alone stops
    assert chat.turn_end_ids(tok, TEMPLATE.replace("\n", "</s>\n")) == [tok.eos_token_id]
    assert chat.turn_end_ids(tok, "{{ raise_exception('no') }}") == []
    assert chat.stop_ids(None, turn_tok, TURN_TEMPLATE) == sorted({turn_tok.eos_token_id, end})
    assert chat.stop_key(None, tok, TEMPLATE) == []  # cache keys of EOS-terminated templates are unchanged
    assert chat.stop_key(None, turn_tok, TURN_TEMPLATE) == [["turn-end", [end]]]


def test_generate_replies_stop_at_the_turn_end(tiny_chat_src, turn_tok, monkeypatch):
    """A reply ends at the template's end-of-turn token even when it is not EOS: the scripted
    sampler emits a word, the turn end, then more words, which must not reach the reply."""
    end = turn_tok.convert_tokens_to_ids(TURN_END)
    word = turn_tok("river", add_special_tokens=False)["input_ids"][-1]
    script = iter([word, end] + [word] * 10)
    monkeypatch.setattr(chat, "sample_next", lambda logits, gen: torch.tensor([next(script)] * logits.shape[0]))
    conv = [{"role": "user", "content": "the war"}]
    out = chat.generate_replies(tiny_chat_src.model, turn_tok, TURN_TEMPLATE, [conv], seed=0, max_new=8, greedy=True)
    assert out[0][-1] == {"role": "assistant", "content": turn_tok.decode([word]).strip()}


# ---------------------------------------------------------------- calibration mix

def test_split_counts_and_interleave():
    assert [chat.split_counts(n) for n in (1, 2, 4, 8, 32)] == [(1, 0), (2, 0), (3, 1), (6, 2), (24, 8)]
    c, p = torch.zeros(6, 2), torch.ones(2, 2)
    assert chat.interleave(c, p)[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_pack_windows_start_at_conversations():
    seqs = [torch.arange(10), torch.arange(100, 105), torch.arange(200, 230), torch.arange(300, 304)]
    w = chat.pack_windows(seqs, 5, 12)
    assert len(w) == 2  # 10+5 -> window 1 (cut), 30 -> window 2 (cut); 4 left over: not a window
    assert w[0].tolist() == list(range(10)) + [100, 101]
    assert w[1].tolist() == list(range(200, 212))


def test_resolve_calibration(monkeypatch, tmp_path):
    assert chat.resolve_calibration(None, TEMPLATE) == "chat"
    assert chat.resolve_calibration("x.txt", TEMPLATE) == "x.txt"
    monkeypatch.setattr("asvd2gguf.text._wiki", lambda: None)
    assert chat.resolve_calibration(None, None) == "selfgen"
    with pytest.raises(UserError, match="--calib wiki"):
        chat.resolve_calibration("wiki", TEMPLATE)
    monkeypatch.setattr("asvd2gguf.text._wiki", lambda: tmp_path / "wiki.valid.tokens")
    assert chat.resolve_calibration("wiki", None) == str(tmp_path / "wiki.valid.tokens")


def test_chat_calibration_mix_and_cache(tiny_chat_src, calib_text, tmp_path, monkeypatch):
    src = tiny_chat_src
    monkeypatch.setattr(chat, "default_calibration", lambda: str(calib_text))
    tokens, desc = chat.calibration_tokens(src, None, 8, 48, 233, tmp_path)
    assert tokens.shape == (8, 48) and tokens.dtype == torch.long
    assert desc.startswith("chat (6 windows") and "2 of calib.txt" in desc
    plain = calibration_windows(src.tokenizer, str(calib_text), 2, 48, 233)
    assert torch.equal(tokens[3], plain[0]) and torch.equal(tokens[7], plain[1])
    cached = json.loads(next((tmp_path / "chat").glob("*.json")).read_text())["conversations"]
    first = chat.encode(src.tokenizer, chat.render(src.tokenizer, TEMPLATE, cached[0]))
    head = first[:48]
    assert torch.equal(tokens[0, :len(head)], head)  # a chat window starts at a conversation's first token
    assert cached[0][0]["role"] == "user" and cached[0][0]["content"] in chat.load_prompts("calibration")
    assert len(cached) % chat.GEN_BATCH == 0

    def boom(*a, **k):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(chat, "generate_replies", boom)
    again, _ = chat.calibration_tokens(src, "chat", 8, 48, 233, tmp_path)
    assert torch.equal(again, tokens)


def test_jsonl_calibration(tiny_chat_src, tmp_path, monkeypatch):
    src = tiny_chat_src
    p = tmp_path / "c.jsonl"
    words = "the city river album song game team season war world people music film".split()
    lines = [{"messages": [{"role": "user", "content": " ".join(words[i:] + words[:i])},
                           {"role": "assistant", "content": " ".join(words[::-1])}]} for i in range(6)]
    p.write_text("\n".join(json.dumps(x) for x in lines))
    monkeypatch.setattr(chat, "generate_replies", lambda *a, **k: pytest.fail("complete conversations: no replies"))
    tokens, desc = chat.calibration_tokens(src, str(p), 3, 32, 1, tmp_path)
    assert tokens.shape == (3, 32) and "c.jsonl" in desc
    first = chat.encode(src.tokenizer, chat.render(src.tokenizer, TEMPLATE, lines[0]["messages"]))
    assert torch.equal(tokens[0], first[:32])
    with pytest.raises(UserError, match="fills only"):
        chat.calibration_tokens(src, str(p), 50, 32, 1, tmp_path)


def test_jsonl_user_turns_get_replies(tiny_chat_src, tmp_path):
    src = tiny_chat_src
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"the song {i}"}]}) for i in range(3)))
    tokens, _ = chat.calibration_tokens(src, str(p), 2, 24, 1, tmp_path)
    convs = json.loads(next((tmp_path / "chat").glob("*.json")).read_text())["conversations"]
    assert len(convs) == 3 and all(c[-1]["role"] == "assistant" for c in convs)
    assert tokens.shape == (2, 24)


def test_chat_calibration_needs_a_template(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    code, _, err = run_cli(["convert", tiny_models["llama"], "--calib", "chat", "--calib-samples", "2",
                            "--calib-seqlen", "32", "--out", tmp_path / "x.gguf", "--cache-dir", cache_dir,
                            "--device", "cpu"], capsys)
    assert code == 1 and "needs a chat template" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------- KLD base file

def _reference_row(logits: np.ndarray) -> np.ndarray:
    """tools/perplexity/perplexity.cpp's log_softmax (uint16 output), transcribed line by line."""
    n = len(logits)
    mx, mn = float(np.float32(logits.max())), float(np.float32(logits.min()))
    mn = max(mn, mx - 16)
    lse = np.float32(math.log(sum(math.exp(np.float32(x) - np.float32(mx)) for x in logits)))
    min_lp = np.float32(np.float32(mn) - np.float32(mx) - lse)
    scale = np.float32((np.float32(mx) - np.float32(mn)) / np.float32(65535.0))
    levels = [int(np.rint(np.float32(1 / scale) * (np.float32(x) - np.float32(mn)))) if x > mn else 0 for x in logits]
    head = np.array([scale, min_lp], dtype=np.float32).view(np.uint16)
    return np.concatenate([head, np.array(levels, np.uint16), np.zeros(2 * ((n + 1) // 2) - n, np.uint16)])


def test_quantize_log_probs_matches_llama_cpp():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 37)) * 6).astype(np.float32)
    q = chateval.quantize_log_probs(logits)
    assert q.shape == (3, 2 * 19 + 4) and q.dtype == np.uint16
    for i in range(3):
        assert np.array_equal(q[i], _reference_row(logits[i]))
    # decoded as llama.cpp reads it: log-probs within half a level wherever they are above the floor
    scale, min_lp = q[:, :4].copy().view(np.float32).T
    dec = scale[:, None] * q[:, 4:41] + min_lp[:, None]
    ref = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    keep = ref > min_lp[:, None] + 1e-3
    assert np.all(np.abs(dec - ref)[keep] <= scale[:, None].repeat(37, 1)[keep] * 0.51 + 1e-5)


def test_write_kl_base_layout(tiny_chat_src, tmp_path):
    model = tiny_chat_src.model
    ids = torch.randint(3, 512, (3 * 32 + 5,))
    path = tmp_path / "b.kld"
    n = chateval.write_kl_base(model, ids, 32, 512, True, 1, path)
    raw = path.read_bytes()
    assert n == 3 and raw[:8] == b"_logits_"
    ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype="<i4")
    assert (ctx, n_vocab, n_chunk) == (32, 512, 3)
    toks = np.frombuffer(raw[20:20 + 4 * 96], dtype="<i4")
    assert np.array_equal(toks, ids[:96].numpy())  # the original tokens, BOS only at run time
    nv = 512 + 4
    assert len(raw) == 20 + 4 * 96 + 3 * (32 - 1 - 16) * nv * 2


# ---------------------------------------------------------------- eval CLI error paths

def _tiny_gguf(path, template: str | None = TEMPLATE):
    w = gguf.GGUFWriter(str(path), "llama")
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("x", np.zeros(4, np.float32))
    finish_gguf(w)
    return path


@pytest.mark.parametrize("args,fragment", [
    (["{ok}"], "give --text FILE (perplexity) or --chat"),
    (["/nonexistent/x.gguf", "--chat"], "file not found"),
    (["{bad}", "--chat"], "not a readable GGUF"),
    (["{ok}", "--chat", "--ctx", "8"], "--ctx must be at least 16"),
    (["{ok}", "--chat", "--base", "/nonexistent/base.gguf"], "base model file not found"),
    (["{ok}", "--chat", "--base", "no-such-model"], "model not found"),
    (["{plain}", "--chat"], "plain.gguf has no chat template"),
    (["{plain}", "--chat", "--base", "smollm2"], "plain.gguf has no chat template"),
])
def test_eval_chat_errors(tmp_path, capsys, args, fragment, monkeypatch):
    monkeypatch.setattr(chateval, "question_score", lambda *a, **k: pytest.fail("ran the questions"))
    ok = _tiny_gguf(tmp_path / "ok.gguf")
    plain = _tiny_gguf(tmp_path / "plain.gguf", template=None)  # a base model's GGUF: no tokenizer.chat_template
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, out, err = run_cli(["eval", *[a.format(ok=ok, bad=bad, plain=plain) for a in args]], capsys)
    assert code != 0 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], err


def test_eval_chat_base_without_template(tiny_models, cache_dir, tmp_path, capsys, monkeypatch):
    """A base model with no chat template (the tiny llama's tokenizer has none) fails in one line
    before any question is asked: its KLD would be against conversations it cannot render."""
    monkeypatch.setattr(chateval, "question_score", lambda *a, **k: pytest.fail("ran the questions"))
    ok = _tiny_gguf(tmp_path / "ok.gguf")
    code, _, err = run_cli(["eval", ok, "--chat", "--base", tiny_models["llama"], "--cache-dir", cache_dir], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "has no chat template" in lines[0] and "Traceback" not in err


def test_question_score_needs_a_template(tmp_path, monkeypatch):
    """Without tokenizer.chat_template llama.cpp would answer through its ChatML fallback: the
    library call refuses too (bench scripts call it directly), before asking anything."""
    monkeypatch.setattr(chateval, "ask", lambda *a, **k: pytest.fail("asked a question"))
    plain = _tiny_gguf(tmp_path / "base.gguf", template=None)
    with pytest.raises(UserError, match="base.gguf has no chat template"):
        chateval.question_score(plain)
    assert chateval.require_template(_tiny_gguf(tmp_path / "chat.gguf")) == TEMPLATE


# ---------------------------------------------------------------- through the patched llama.cpp

@pytest.fixture(scope="module")
def tiny_chat_gguf(module_tmp):
    """A tiny random llama GGUF with SmolLM2's tokenizer and chat template, and a low-rank twin."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gguf_fixtures as fx

    root = module_tmp("chatgguf")
    dense = fx.write_tiny("llama", root / "tiny-chat.gguf")
    low = fx.write_factored(dense, root / "tiny-chat-lr.gguf", rank=lambda b, il, s: 8, outtype="f32")
    return dense, low


def test_ask_returns_only_the_reply(tiny_chat_gguf):
    reply = chateval.ask(tiny_chat_gguf[0], "What is the capital of France?", threads=1, n_predict=8)
    assert "llama_model_loader" not in reply and "[end of text]" not in reply
    assert not reply.startswith("What is the capital")  # the prompt is not echoed


def test_chat_kld_against_itself_and_a_truncated_twin(tiny_chat_gguf, tmp_path, monkeypatch):
    """The base file written from torch logits is read by llama-perplexity as its own: the same
    model scores ~0 KLD and the same top token almost everywhere; a rank-8 twin scores more."""
    dense, low = tiny_chat_gguf
    held = chat.load_prompts("heldout")[:8]  # one generation batch: enough tokens for 4 chunks
    monkeypatch.setattr(chateval, "load_prompts", lambda split: held)
    base = chateval.load_eval_model(str(dense), tmp_path)
    assert chat.chat_template(base.tokenizer, base.gguf)  # SmolLM2's template came along
    same = chateval.chat_kld(dense, base, tmp_path, ctx=128, chunks=4, threads=1)
    assert same["chunks"] == 4 and same["conversations"] == 8
    assert same["kld"] < 1e-3 and same["same_top_p"] > 0.97
    other = chateval.chat_kld(low, base, tmp_path, ctx=128, chunks=4, threads=1)
    assert other["kld"] > 50 * max(same["kld"], 1e-5)


def test_eval_text_base_takes_an_embedded_name(tmp_path, capsys, monkeypatch):
    """`eval FILE --text T --base smollm2` measures KLD against the embedded model's shipped GGUF
    (as --chat accepts the name), instead of looking for a file called smollm2."""
    from asvd2gguf import llamacpp
    from asvd2gguf.source import embedded_path

    seen = {}
    real = llamacpp.perplexity
    monkeypatch.setattr(llamacpp, "perplexity", lambda file, text, **kw: seen.update(kw) or {"ppl": 1.0})
    ok = _tiny_gguf(tmp_path / "ok.gguf")
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    code, out, err = run_cli(["eval", str(ok), "--text", str(text), "--base", "smollm2"], capsys)
    assert code == 0, err
    assert seen["kl_base"] == embedded_path("smollm2") and seen["kl_base"].is_file()
    # a wrong base is named as the base, in one line, before llama-perplexity runs
    monkeypatch.setattr(llamacpp, "perplexity", real)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    for base, fragment in ((str(tmp_path / "nope.gguf"), "base file not found"), (str(tmp_path), "is a directory"),
                           ("", "--base is empty"), ("smollm3", "not an embedded model (smollm2, gemma3-270m)"),
                           (str(notes), "is neither a GGUF nor a logits file")):
        code, _, err = run_cli(["eval", str(ok), "--text", str(text), "--base", base], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, (base, err)


def test_parsed_percentages_have_no_binary_noise():
    """llama-perplexity's "Same top p: 94.412" is 0.94412, as printed (a new user saw 0.9441200000000001)."""
    from asvd2gguf.llamacpp import parse_perplexity

    res = parse_perplexity("Mean    KLD:   0.011160 ±   0.000268\nSame top p: 94.412 ± 0.254 %\n")
    assert repr(res["same_top_p"]) == "0.94412" and res["kld"] == 0.01116
