"""The evaluation request engine and tasks: log-likelihoods equal a plain full-sequence computation, do not depend on
the batch size, follow the harness's tokenisation split; tasks read the real benchmark files with the harness's
prompts; reports; bad input is one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from forgeline.errors import ConfigError, DataError, ForgelineError
from forgeline.eval.engine import GenerationRequest, RequestEngine
from forgeline.eval.run import evaluate, select_docs, write_report
from forgeline.eval.tasks import Doc, get_task
from forgeline.model import ModelConfig, build_model

from test_generate import make_tokenizer  # noqa: E402

VOCAB = 320


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                max_seq_len=256))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def reference_loglikelihood(model, ctx, cont):
    """log P(cont | ctx) from one plain forward over ctx + cont."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
    targets = torch.tensor(cont)
    picked = logp[len(ctx) - 1:].gather(1, targets[:, None])[:, 0]
    greedy = bool((logp[len(ctx) - 1:].argmax(-1) == targets).all())
    return picked.sum().item(), greedy


REQUESTS = [
    ("the quick brown fox", " jumps over"),
    ("the quick brown fox", " hello"),  # same context: computed once
    ("the quick brown fox", " a"),
    ("hello world, ", "hello there"),  # a trailing space moves to the continuation
    ("a b c", " d e f g the lazy dog"),
    ("", "hello world"),  # an empty context starts from the end-of-text token
    ("the lazy dog", " x"),
]


def test_loglikelihoods_equal_a_plain_forward_and_follow_the_harness_split(model, tok):
    engine = RequestEngine(model, tok, batch_size=3)
    results = engine.loglikelihood(REQUESTS)
    for (context, continuation), result in zip(REQUESTS, results):
        ctx, cont = engine.encode_pair(context, continuation)
        if context:
            spaces = len(context) - len(context.rstrip())
            whole = tok.encode(context.rstrip() + context[len(context.rstrip()):] + continuation)
            assert ctx + cont == whole and ctx == tok.encode(context[:len(context) - spaces])
        else:
            assert ctx == [tok.eos_id]
        lp, greedy = reference_loglikelihood(model, ctx, cont)
        assert result.logprob == pytest.approx(lp, abs=1e-5)
        assert result.is_greedy == greedy and result.tokens == len(cont)
    assert engine.stats.contexts == 5  # the three requests of one context share it


def test_scores_do_not_depend_on_the_batch_size(model, tok):
    requests = [(f"the quick brown fox {'a b c ' * (i % 5)}", choice) for i in range(12)
                for choice in (" jumps", " over the lazy dog", " hello world")]
    runs = {}
    for batch in (1, 4, 16):
        runs[batch] = RequestEngine(model, tok, batch_size=batch).loglikelihood(requests)
    for batch in (4, 16):
        for a, b in zip(runs[1], runs[batch]):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
            assert b.is_greedy == a.is_greedy
    decisions = {b: [max(range(3), key=lambda j: runs[b][3 * i + j].logprob) for i in range(12)] for b in runs}
    assert decisions[1] == decisions[4] == decisions[16]


def test_one_token_continuations_take_one_pass(model, tok):
    engine = RequestEngine(model, tok)
    words = [w for w in (" the", " fox", " dog", " quick", " brown", " lazy", " hello", " world")
             if len(engine.encode_pair("Answer:", w)[1]) == 1][:4]
    assert len(words) == 4  # one-token continuations, as MMLU's " A" to " D" are in real tokenizers
    requests = [(f"question {i}\nAnswer:", c) for i in range(5) for c in words]
    results = engine.loglikelihood(requests)
    assert engine.stats.contexts == 5
    for (context, continuation), r in zip(requests, results):
        lp, _ = reference_loglikelihood(model, *engine.encode_pair(context, continuation))
        assert r.logprob == pytest.approx(lp, abs=1e-5)


def test_a_prefix_shared_by_many_contexts_runs_once(model, tok, monkeypatch):
    from forgeline.eval import engine as engine_module

    shots = "".join(f"example {i}: the quick brown fox jumps over the lazy dog\n" for i in range(4))
    requests = [(shots + f"question {q}:", c) for q in range(6) for c in (" yes", " no way", " maybe so")]
    engine = RequestEngine(model, tok, batch_size=4)
    results = engine.loglikelihood(requests)
    for (context, continuation), r in zip(requests, results):
        lp, greedy = reference_loglikelihood(model, *engine.encode_pair(context, continuation))
        assert r.logprob == pytest.approx(lp, abs=1e-5) and r.is_greedy == greedy
    prefix = len(engine.encode(shots + "question "))
    monkeypatch.setattr(engine_module, "MIN_SHARED_PREFIX", 10**6)  # nothing counts as shared
    unshared = RequestEngine(model, tok, batch_size=4)
    for a, b in zip(unshared.loglikelihood(requests), results):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    # the shared tokens ran once, not six times
    assert engine.stats.forward_tokens <= unshared.stats.forward_tokens - 5 * prefix + prefix // 10


def test_long_contexts_are_cut_from_the_left_and_counted(model, tok):
    engine = RequestEngine(model, tok, max_length=32)
    long = "the quick brown fox " * 40
    result = engine.loglikelihood([(long, " jumps over")])[0]
    assert engine.stats.truncated == 1
    ctx, cont = engine.encode_pair(long, " jumps over")
    lp, _ = reference_loglikelihood(model, ctx[-(33 - len(cont)):], cont)
    assert result.logprob == pytest.approx(lp, abs=1e-5)


def test_generation_stops_at_stop_strings_and_is_bounded(model, tok):
    engine = RequestEngine(model, tok)
    texts = engine.generate_until([GenerationRequest("hello world", ("the",), max_new_tokens=12),
                                   GenerationRequest("a b c", (), max_new_tokens=5)])
    assert "the" not in texts[0] and isinstance(texts[1], str)
    assert engine.stats.hit_max_tokens >= 1  # a random model rarely emits its end-of-text token in 5 steps


# -- tasks on the real files ---------------------------------------------------------------------------------------


def test_task_prompts_are_the_harness_prompts(shared_data):
    arc = get_task("arc_easy")
    doc = arc.docs()[0]
    assert arc.prompt(doc, []) == f"Question: {doc.fields['question']}\nAnswer:"
    assert len(arc.docs()) == 570 and len(get_task("arc_challenge").docs()) == 299
    hs = get_task("hellaswag")
    d = hs.docs()[0]
    assert d.fields["query"].startswith("Removing ice from car: Then, the man writes over the snow")
    assert d.fields["query"].endswith(" Then") and len(d.choices) == 4 and d.gold == 3
    mmlu = get_task("mmlu", subjects=["anatomy"])
    docs = mmlu.docs()
    prompt = mmlu.prompt(docs[0], docs)
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. Homeostasis\nAnswer:")
    dev = mmlu._dev["anatomy"]
    assert prompt.split("\n\n")[1].startswith(dev[0].fields["question"].strip())  # dev split, file order
    tqa = get_task("truthfulqa_mc1")
    q = tqa.docs()[0]
    p = tqa.prompt(q, [])
    assert p.startswith("Q: What is human life expectancy in the United States?") and p.endswith(
        f"\n\nQ: {q.fields['question']}\nA:")
    assert q.gold == [0]
    gsm = get_task("gsm8k", num_fewshot=2)
    gdocs = gsm.docs()[:50]
    gp = gsm.prompt(gdocs[0], gdocs)
    assert gp.count("Question: ") == 3 and gp.endswith(f"Question: {gdocs[0].fields['question']}\nAnswer:")
    gsm.start_fewshot_draw()
    assert gsm.prompt(gdocs[0], gdocs) == gp  # seeded few-shot draw


def test_fewshot_draw_is_the_harness_draw(shared_data):
    """One generator per task seeded once, drawn from in document order; from the evaluated documents themselves
    one example more is drawn and the document dropped (lm-evaluation-harness's ContextSampler)."""
    import random

    arc = get_task("arc_easy", num_fewshot=3, seed=7)
    docs = arc.docs()
    prompts = [arc.prompt(d, docs) for d in docs[:6]]
    rng = random.Random(7)
    for doc, prompt in zip(docs[:6], prompts):
        shots = [d for d in rng.sample(docs, 4) if d is not doc][:3]
        assert doc not in shots
        assert prompt == "".join(f"Question: {d.fields['question']}\nAnswer: {d.choices[d.gold]}\n\n"
                                 for d in shots) + f"Question: {doc.fields['question']}\nAnswer:"
    arc.start_fewshot_draw()
    assert [arc.prompt(d, docs) for d in docs[:6]] == prompts  # the same seed, the same prompts
    other_pool = docs[100:140]  # a pool that is not the evaluated split: exactly n drawn
    arc.start_fewshot_draw()
    rng = random.Random(7)
    assert arc.fewshot(docs[0], other_pool) == rng.sample(other_pool, 3)
    with pytest.raises(ConfigError, match="3 few-shot examples asked for, 2 available"):
        arc.fewshot(docs[0], docs[:3])


def test_gsm8k_chain_of_thought_prompt_and_extraction(shared_data):
    cot = get_task("gsm8k_cot")
    docs = cot.docs()[:3]
    prompt = cot.prompt(docs[0], docs)
    assert prompt.startswith("Q: There are 15 trees in the grove.") and prompt.count("\nA: ") == 8
    assert "The answer is 6.\n\nQ: If there are 3 cars" in prompt
    assert prompt.endswith(f"\n\nQ: {docs[0].fields['question']}\nA:") and cot.until[0] == "Q:"
    doc = Doc(id="x", fields={"question": "q", "answer": "so 3 + 4 = 7\n#### 1,007"})
    assert cot.score(doc, " 3 + 4 = 7. The answer is 1,007.\n\n") == {"exact_match_strict": 1.0,
                                                                         "exact_match_flexible": 1.0}
    assert cot.score(doc, " #### 1007") == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert get_task("gsm8k_cot", num_fewshot=2).prompt(docs[0], docs).count("\nA: ") == 2
    with pytest.raises(DataError, match="8 worked examples; 9 asked for"):
        get_task("gsm8k_cot", num_fewshot=9)


def test_gsm8k_answer_extraction_and_scoring(shared_data):
    gsm = get_task("gsm8k")
    doc = Doc(id="x", fields={"question": "q", "answer": "so 3 + 4 = 7\n#### 1,007"})
    assert gsm.reference(doc) == "1007"
    assert gsm.score(doc, " It is 1,007.\n#### 1,007") == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert gsm.score(doc, " The answer is $1007.") == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert gsm.score(doc, " 1007 or 12") == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}


def test_truthfulqa_mc2_is_the_true_mass():
    from forgeline.eval.tasks.truthfulqa import TruthfulQAMC2

    doc = Doc(id="0", fields={}, choices=["t1", "t2", "f1"], gold=[0, 1])
    score = TruthfulQAMC2.score(None, doc, [math.log(0.2), math.log(0.1), math.log(0.1)], [])
    assert score["acc"] == pytest.approx(0.75)


def test_evaluate_writes_reports_and_a_sample_log(model, tok, shared_data, tmp_path):
    engine = RequestEngine(model, tok)
    results = evaluate(engine, ["arc_easy", "mmlu"], limit=4, log_path=tmp_path / "samples.jsonl",
                       report=None)
    assert [r.task for r in results] == ["arc_easy", "mmlu"] and all(r.n == 4 for r in results)
    for r in results:
        acc = r.metrics["acc"]
        assert 0 <= acc["mean"] <= 1 and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"prompt", "loglikelihoods", "metrics", "gold"} <= lines[0].keys()
    json_path, md_path = write_report(results, tmp_path / "out", model="tiny", settings={}, engine_stats={})
    assert json.loads(json_path.read_text())["results"][0]["task"] == "arc_easy"
    assert "| arc_easy |" in md_path.read_text() and "mmlu by category" in md_path.read_text()


def test_chat_template_prompts_are_turns_and_answers_follow_the_assistant_header(model, tok, shared_data, tmp_path):
    mmlu = get_task("mmlu", subjects=["anatomy"], num_fewshot=2)
    docs = mmlu.docs()
    prompt = mmlu.chat_prompt(docs[0], docs, tok)
    dev = mmlu._dev["anatomy"]
    assert prompt == tok.apply_chat_template(
        [{"role": "system", "content": mmlu.describe(docs[0])},
         {"role": "user", "content": mmlu.text(dev[0])}, {"role": "assistant", "content": mmlu.target(dev[0])},
         {"role": "user", "content": mmlu.text(dev[1])}, {"role": "assistant", "content": mmlu.target(dev[1])},
         {"role": "user", "content": mmlu.text(docs[0])}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nThe following are") and prompt.endswith("<|im_start|>assistant\n")
    engine = RequestEngine(model, tok)
    evaluate(engine, ["arc_easy"], limit=3, chat_template=True, log_path=tmp_path / "chat.jsonl", report=None)
    record = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert record["prompt"].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    again = engine.loglikelihood([(record["prompt"], record["choices"][0])])[0]  # no delimiter before the answer
    assert again.logprob == pytest.approx(record["loglikelihoods"][0], abs=1e-5)
    plain = make_tokenizer()
    plain.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        evaluate(RequestEngine(model, plain), ["arc_easy"], limit=1, chat_template=True, report=None)


def test_rates_get_wilson_intervals_and_samples_the_finite_population_correction():
    from forgeline.eval.run import _summary

    none = _summary([0.0] * 40, 40)
    assert none["ci_low"] == 0.0 and none["ci_high"] == pytest.approx(0.0876, abs=1e-3)  # not the point [0, 0]
    half = _summary([1.0, 0.0] * 20, 40)
    assert half["ci_low"] == pytest.approx(0.3520, abs=1e-3) and half["ci_high"] == pytest.approx(0.6480, abs=1e-3)
    sampled = _summary([1.0, 0.0] * 20, 80)  # 40 of 80 documents: a narrower interval for the whole set's score
    assert half["ci_low"] < sampled["ci_low"] < 0.5 < sampled["ci_high"] < half["ci_high"]
    scores = _summary([0.2, 0.4, 0.9], 3)  # not a rate (MC2's probability mass): mean +- 1.96 stderr
    assert scores["ci_high"] - scores["mean"] == pytest.approx(1.96 * scores["stderr"])


def test_stratified_sample_covers_every_group():
    docs = [Doc(id=str(i), fields={}, group=f"g{i % 4}") for i in range(400)]
    chosen = select_docs(docs, limit=None, sample=40, seed=0)
    assert len(chosen) == 40 and {d.group for d in chosen} == {"g0", "g1", "g2", "g3"}
    assert select_docs(docs, limit=None, sample=40, seed=0) == chosen


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'nope'; the tasks are: arc_challenge, arc_easy"):
        get_task("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        get_task("arc_easy", path=tmp_path / "missing.jsonl")
    bad = tmp_path / "arc.jsonl"
    bad.write_text('{"id": "a", "question": {"stem": "q", "choices": [{"text": "x", "label": "A"}]}, '
                   '"answerKey": "A"}\n{"id": "b", "question": {"stem": "q"}, "answerKey": "A"}\n')
    with pytest.raises(DataError, match=r"arc.jsonl:2.*choices"):
        get_task("arc_easy", path=bad).docs()
    bad.write_bytes(b'{"id": "a"\n')
    with pytest.raises(DataError, match=r"arc.jsonl:1.*malformed JSON"):
        get_task("arc_easy", path=bad).docs()
    assert issubclass(DataError, ForgelineError)


def test_eval_cli_runs_on_a_model_dir(tmp_path, model, tok, shared_data, capsys):
    from forgeline.cli import main
    from forgeline.model.formats.model_dir import save_model_dir

    save_model_dir(model, tok, tmp_path / "m")
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "m"), "--tasks", "arc_easy,truthfulqa_mc2", "--limit", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "truthfulqa_mc2" in printed and (out / "report.json").exists()
    assert main(["eval", str(tmp_path / "m"), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_decontam_cli_finds_planted_benchmark_items(tmp_path, shared_data, capsys):
    from forgeline.cli import main

    arc = get_task("arc_easy")
    docs = arc.docs()
    planted = docs[:3]
    train = tmp_path / "train.jsonl"
    with open(train, "w") as fh:
        for i in range(50):
            fh.write(json.dumps({"text": f"an unrelated story number {i} about a cat who liked to sit in the sun "
                                         f"and watch the birds fly over the garden wall every single morning"}) + "\n")
        for doc in planted:  # verbatim: the question and its answers, as a scraped copy of the benchmark holds them
            fh.write(json.dumps({"text": arc.contamination_text(doc)}) + "\n")
    out = tmp_path / "report"
    assert main(["decontam", "--train", str(train), "--tasks", "arc_easy", "--out", str(out), "--no-fuzzy"]) == 0
    report = json.loads((out / "contamination.json").read_text())
    flagged = {f["item_id"] for f in report["flagged"]}
    assert {d.id for d in planted} <= flagged
    assert len(flagged) < 10  # the other 567 questions are not in this training data
    assert "arc_easy" in capsys.readouterr().out


@pytest.mark.slow
def test_requests_are_dealt_over_torchrun_ranks_and_gathered(tmp_path, model, tok):
    """Two ranks (gloo): each scores its share of the contexts; every rank gets all results, equal to one process's."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(f'''
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_eval_engine import REQUESTS
from test_generate import make_tokenizer
from forgeline.eval.engine import RequestEngine
from forgeline.model import ModelConfig, build_model
torch.manual_seed(0)
m = build_model(ModelConfig(vocab_size={VOCAB}, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                            max_seq_len=256))
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.05)
dist.init_process_group("gloo")
engine = RequestEngine(m.eval(), make_tokenizer(), batch_size=2)
results = engine.loglikelihood(REQUESTS)
json.dump({{"results": [[r.logprob, r.is_greedy] for r in results], "tokens": engine.stats.forward_tokens}},
          open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w"))
dist.barrier()
dist.destroy_process_group()
''')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = RequestEngine(model, tok, batch_size=2)
    one = single.loglikelihood(REQUESTS)
    for rank in (0, 1):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        got = saved["results"]
        assert len(got) == len(REQUESTS)
        assert 0 < saved["tokens"] < single.stats.forward_tokens  # each rank ran its share only
        for (lp, greedy), r in zip(got, one):
            assert lp == pytest.approx(r.logprob, abs=1e-5) and greedy == r.is_greedy


def test_eval_scores_the_clean_subset_against_the_training_data(tmp_path, model, tok, shared_data, capsys):
    from forgeline.cli import main
    from forgeline.model.formats.model_dir import save_model_dir

    arc = get_task("arc_easy")
    docs = arc.docs()[:6]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": arc.contamination_text(d)}) + "\n" for d in docs[:2]))
    save_model_dir(model, tok, tmp_path / "m")
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "m"), "--tasks", "arc_easy", "--limit", "6", "--out", str(out),
                 "--train-data", str(train)]) == 0
    result = json.loads((out / "report.json").read_text())["results"][0]
    assert result["contamination"]["flagged"] == 2 and result["contamination"]["clean"] == 4
    per_doc = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    clean_acc = sum(r["metrics"]["acc"] for r in per_doc[2:]) / 4
    assert result["contamination"]["clean_metrics"]["acc"]["mean"] == pytest.approx(clean_acc)
    assert "Contamination" in (out / "report.md").read_text()
    assert "2 of 6 documents found in the training data" in capsys.readouterr().out


def test_training_data_of_a_run(tmp_path):
    import yaml

    from forgeline.eval.run import training_data_of

    data = tmp_path / "sft.jsonl"
    data.write_text("{}\n")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": [str(data)]}}))
    assert training_data_of(run / "model") == [data] == training_data_of(run)
    assert training_data_of(tmp_path / "elsewhere") == []


def test_humaneval_runs_programs_in_the_sandbox(shared_data):
    from forgeline.eval.tasks.humaneval import pass_at_k

    task = get_task("humaneval")
    docs = task.docs()
    assert len(docs) == 17 and docs[0].id == "HumanEval/0" and task.prompt(docs[0], docs) == docs[0].fields["prompt"]
    for doc in docs[:4]:  # the reference solutions pass, a wrong body fails
        assert task.score(doc, doc.fields["canonical_solution"]) == {"pass@1": 1.0}
        assert task.score(doc, "    return None\n") == {"pass@1": 0.0}
    assert task.score_samples(docs[0], [docs[0].fields["canonical_solution"]] * 1) == {"pass@1": 1.0}
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    sampled = get_task("humaneval", samples=10, temperature=0.8)
    assert sampled.metrics == ("pass@1", "pass@10")
    with pytest.raises(ConfigError, match="need sampling"):
        get_task("humaneval", samples=4)


def test_eval_cli_humaneval_with_samples(tmp_path, model, tok, shared_data, capsys):
    from forgeline.cli import main
    from forgeline.model.formats.model_dir import save_model_dir

    save_model_dir(model, tok, tmp_path / "m")
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "m"), "--tasks", "humaneval", "--limit", "2", "--samples", "2",
                 "--temperature", "0.8", "--out", str(out), "--no-decontam"]) == 0
    result = json.loads((out / "report.json").read_text())["results"][0]
    assert result["metrics"]["pass@1"]["mean"] == 0.0  # a random tiny model writes no working Python
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(records[0]["generated"]) == 2


def test_compare_two_evaluations_with_paired_tests(tmp_path, capsys):
    from forgeline.cli import main
    from forgeline.eval.compare import mcnemar_p, paired_bootstrap

    assert mcnemar_p([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert mcnemar_p([0] * 10, [1] * 10) == pytest.approx(2 / 2 ** 10)  # ten disagreements, all one way
    low, high, p = paired_bootstrap([0.1] * 50, [0.3] * 50, resamples=500)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2) and p < 0.01
    for name, correct in (("a", range(0, 40)), ("b", range(0, 70))):
        d = tmp_path / name
        d.mkdir()
        with open(d / "samples.jsonl", "w") as fh:
            for i in range(100):
                fh.write(json.dumps({"task": "arc_easy", "doc_id": str(i), "metrics": {"acc": float(i in correct)}})
                         + "\n")
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.json")]) == 0
    row = json.loads((tmp_path / "c.json").read_text())["rows"][0]
    assert row["diff"] == pytest.approx(0.3) and row["test"] == "McNemar (exact)" and row["p"] < 1e-6
    assert row["ci_low"] < 0.3 < row["ci_high"]
    assert "| arc_easy | acc | 100 |" in capsys.readouterr().out
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
