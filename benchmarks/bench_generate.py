"""`sltrain generate`'s decoding against transformers' `generate` on the same weights (prints; never asserted).

    python benchmarks/bench_generate.py                       # llama_20m (the default run's shape), 256 new tokens
    python benchmarks/bench_generate.py --model llama_60m --new-tokens 64,256
    python benchmarks/bench_generate.py --model llama_1b --blocks 2 --method full --new-tokens 32 --no-window

Variants, greedy, batch 1, a 32-token prompt, no end-of-sequence stop (every variant makes all the tokens):
  cached   sltrain's decoding: one prefill, then one token per step over the KV cache (infer.generate_ids), the model
           in its trained SLTrain form (kernels chosen per phase)
  window   how `sltrain generate` decoded before the cache: the whole window recomputed for every new token
  hf       transformers' LlamaForCausalLM.generate (its KV cache) on the dense export of the same weights
Random weights at the model's shape (vocab 8,000, the default BPE's size); decoding cost does not depend on what
the weights learned. Interleaved rounds (the order rotates), medians; ratios to hf. One torch thread by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch


def _window(model, ids, new_tokens, max_seq_len):
    context = list(ids)
    for _ in range(new_tokens):
        window = torch.tensor([context[-max_seq_len:]])
        context.append(int(model(window).logits[0, -1].argmax()))
    return context[len(ids):]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_20m")
    p.add_argument("--method", default="sltrain")
    p.add_argument("--blocks", type=int, default=None, help="only this many decoder blocks (as bench-infer)")
    p.add_argument("--new-tokens", default="16,64,256", help="comma list")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-window", action="store_true", help="skip the (slow) recomputing variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from sltrain_cli.compose import load_config
    from sltrain_cli.export import hf_state_dict
    from sltrain_cli.infer import generate_ids
    from sltrain_cli.runs import build_model

    cfg = load_config([f"model={args.model}", f"method={args.method}"])
    m = dataclasses.replace(cfg.model, vocab_size=8000, num_layers=args.blocks or cfg.model.num_layers)
    ours = build_model(m, cfg.method, seed=0, device=torch.device("cpu")).eval().requires_grad_(False)
    hf = HFLlama(LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                             intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                             num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads, head_dim=m.head_dim,
                             max_position_embeddings=m.max_seq_len, rms_norm_eps=m.rms_norm_eps,
                             rope_theta=m.rope_theta, tie_word_embeddings=False, eos_token_id=1,
                             pad_token_id=0)).eval()
    hf.load_state_dict(hf_state_dict(ours))
    prompt = torch.randint(2, m.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    shape = f"{args.model}" + (f" ({args.blocks} blocks)" if args.blocks else "")
    print(f"# {shape} ({args.method}), prompt {args.prompt_tokens} tokens, greedy, batch 1, {args.threads} "
          f"thread(s), {args.rounds} interleaved rounds, medians; torch {torch.__version__}")
    print("| new tokens | variant | s per sequence | ms per token | vs hf | same tokens as hf |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.new_tokens.split(",")]:
        if args.prompt_tokens + n > m.max_seq_len:
            print(f"| {n} | skipped: prompt + new tokens > max_seq_len {m.max_seq_len} | | | | |")
            continue
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        variants = {
            "cached": lambda n=n: generate_ids(ours, [prompt], n, eos_id=None)[0],
            "hf": lambda n=n, mask=mask: hf.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist(),
        }
        if not args.no_window:
            variants["window"] = lambda n=n: _window(ours, prompt, n, m.max_seq_len)
        names, times, outs = list(variants), {k: [] for k in variants}, {}
        with torch.no_grad():
            for k in names:  # warm-up
                outs[k] = variants[k]()
            for r in range(args.rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    variants[k]()
                    times[k].append(time.perf_counter() - t0)
        hf_s = statistics.median(times["hf"])
        for k in names:
            s = statistics.median(times[k])
            print(f"| {n} | {k} | {s:.3f} | {1e3 * s / n:.2f} | {s / hf_s:.2f}x | {outs[k] == outs['hf']} |")


if __name__ == "__main__":
    main()
