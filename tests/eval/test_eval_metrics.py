"""splice eval: numbers agree with a direct transformers computation on the same tokens."""

import json
import math

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def news_expert(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, m = tiny_zoo
    path = d / "models" / "news"
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_domain_loss_matches_transformers_on_the_same_tokens(tiny_zoo, news_expert):
    from splice.eval import domain_loss

    d, m = tiny_zoo
    path, model, tok = news_expert
    text = (d / m["domains"]["news"]["heldout_file"]).read_text(encoding="utf-8")
    seq, n = 64, 1000
    r = domain_loss(model, tok, text, seq_len=seq, max_tokens=n, batch_size=3)
    ids = tok(text, add_special_tokens=False).input_ids[:n]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), seq):
            w = torch.tensor([ids[s : s + seq]])
            if w.shape[1] < 2:
                continue
            loss = model(input_ids=w, labels=w).loss  # transformers' own shifted mean
            total += float(loss) * (w.shape[1] - 1)
            count += w.shape[1] - 1
    assert r.tokens == count
    assert r.loss == pytest.approx(total / count, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r.bpb == pytest.approx(r.loss * r.tokens / math.log(2) / r.bytes, rel=1e-9)
    # byte-level BPE covers every byte; the first token of each window is context, not predicted
    assert 0.8 * len(text[: 4 * n].encode()) / 4 < r.bytes <= len(text.encode())


def test_batch_size_does_not_change_the_numbers(tiny_zoo, news_expert):
    from splice.eval import domain_loss

    d, m = tiny_zoo
    _, model, tok = news_expert
    text = (d / m["domains"]["scripture"]["heldout_file"]).read_text(encoding="utf-8")
    a = domain_loss(model, tok, text, seq_len=50, max_tokens=777, batch_size=1)
    b = domain_loss(model, tok, text, seq_len=50, max_tokens=777, batch_size=7)
    assert a.tokens == b.tokens and a.loss == pytest.approx(b.loss, rel=1e-5)


def test_multiple_choice_scores_match_a_full_forward(news_expert):
    from splice.eval import multiple_choice
    from splice.eval.choice import choice_logprobs

    _, model, tok = news_expert
    ctx, choices = "Shares in the bank fell sharply on Monday after", [" profits", " the match ended", " sport"]
    got = choice_logprobs(model, tok, ctx, choices)
    c_ids = tok(ctx, add_special_tokens=False).input_ids
    for lp, ch in zip(got, choices):
        a_ids = tok(ch, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([c_ids + a_ids])).logits[0].float(), -1)
        want = sum(float(logp[len(c_ids) - 1 + i, t]) for i, t in enumerate(a_ids))
        assert lp == pytest.approx(want, abs=1e-4)
    items = [{"context": ctx, "choices": choices, "label": max(range(3), key=got.__getitem__)}]
    assert multiple_choice(model, tok, items)["acc"] == 1.0


def test_bbc_topic_task_is_well_formed(tiny_zoo):
    from splice.eval import read_task

    d, m = tiny_zoo
    items = read_task(d / m["tasks"]["bbc_topics"]["path"])
    assert len(items) >= 50
    assert {len(it["choices"]) for it in items} == {5}
    assert len({it["label"] for it in items}) == 5  # every topic appears


def test_normalized_scores_follow_mergebench():
    from splice.eval import normalized_scores

    losses = {
        "base": {"a": 3.0, "b": 4.0, "g": 2.0},
        "ea": {"a": 2.0, "b": 4.5, "g": 2.2},
        "eb": {"a": 3.5, "b": 3.0, "g": 2.1},
        "merge": {"a": 2.5, "b": 3.2, "g": 2.02},
    }
    s = normalized_scores(losses, "base", {"a": "ea", "b": "eb"}, "g")
    assert s["merge"]["per_domain"] == {"a": 0.5, "b": 0.8}
    assert s["merge"]["normalized"] == pytest.approx(0.65)
    assert s["merge"]["forgetting"] == pytest.approx(0.01)
    assert s["base"]["normalized"] == 0.0 and s["ea"]["per_domain"]["a"] == 1.0


def test_bad_task_line_names_file_and_line(tmp_path):
    from splice.errors import SpliceError
    from splice.eval import read_task

    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n{"context": "b", "choices": ["x"], "label": 3}\n')
    with pytest.raises(SpliceError, match=r"t.jsonl:2: label"):
        read_task(f)


def test_cli_eval_writes_json_with_scores(tiny_zoo, tmp_path, capsys):
    from splice.cli import main

    d, m = tiny_zoo
    out = tmp_path / "r.json"
    # the zoo's own task, cut to 5 items (a task given by name replaces the zoo's): the whole task takes minutes
    task = (d / m["tasks"]["bbc_topics"]["path"]).read_text(encoding="utf-8").splitlines(keepends=True)[:5]
    (tmp_path / "bbc5.jsonl").write_text("".join(task), encoding="utf-8")
    rc = main(
        ["eval", "--zoo", str(d), "--task", f"bbc_topics={tmp_path / 'bbc5.jsonl'}", "--tokens", "256", "--seq-len", "64"]
        + ["--json", str(out), "-q"]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"base", *m["experts"]}
    for name, r in res["models"].items():
        assert set(r["domains"]) == set(m["domains"])
        assert "bbc_topics" in r["tasks"] and r["tasks"]["bbc_topics"]["n"] == 5
        assert "normalized" in r["scores"]
    assert res["models"]["base"]["scores"]["normalized"] == 0.0
    printed = capsys.readouterr().out
    assert "norm" in printed and "base" in printed


def test_cli_eval_reports_a_bad_domain_flag(capsys):
    from splice.cli import main

    assert main(["eval", "x", "--domain", "nofile"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err


def test_bos_tokenizers_get_bos_in_front_of_every_window(tiny_zoo, news_expert):
    from tokenizers import processors

    from splice.eval import domain_loss

    d, m = tiny_zoo
    _, model, tok = news_expert
    tok = type(tok).from_pretrained(d / "models" / "news")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    tok.bos_token = "<|endoftext|>"
    assert tok("a").input_ids[0] == eot
    text = (d / m["domains"]["news"]["heldout_file"]).read_text(encoding="utf-8")
    seq, n = 32, 300
    r = domain_loss(model, tok, text, seq_len=seq, max_tokens=n)
    ids = tok(text, add_special_tokens=False).input_ids[:n]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), seq - 1):
            w = torch.tensor([[eot] + ids[s : s + seq - 1]])
            total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            count += w.shape[1] - 1
    assert r.tokens == count == n
    assert r.loss == pytest.approx(total / count, rel=1e-5)
