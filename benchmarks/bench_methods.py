"""Every method and optimizer variant side by side on the same model, data and tokens (prints; never asserted).

    python benchmarks/bench_methods.py                      # llama_20m on sotu, 40 steps each
    python benchmarks/bench_methods.py --model tiny --steps 10 --quick

Each variant is one `sltrain pretrain` run in a fresh process (so peak RSS is per run), with the same
seed, data order and token count. Columns: total / trainable params, optimizer-state bytes (counted from the
optimizer's tensors after training), peak resident memory of the process, the peak of live torch
allocations during 3 training steps (torch.profiler, via sltrain_cli.measure.measure_memory), tokens/s and the
final validation perplexity; ratios are to full-rank AdamW. Short runs rank methods only roughly: with a
few dozen steps, perplexity mostly reflects early learning speed, not the paper's converged numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "full / adamw": ["method=full"],
    "full / adamw8bit": ["method=full", "optim=adamw8bit"],
    "full / layerwise": ["method=full", "train.layerwise=true", "optim.grad_clip=0"],
    "lowrank": ["method=lowrank"],
    "relora": ["method=relora"],
    "galore": ["method=galore"],
    "sparse (r=0)": ["method=sparse"],
    "sltrain / adamw": ["method=sltrain"],
    "sltrain / adamw8bit": ["method=sltrain", "optim=adamw8bit"],
    "sltrain / 8bit + layerwise": ["method=sltrain", "optim=adamw8bit", "train.layerwise=true", "optim.grad_clip=0"],
}
QUICK = ["full / adamw", "lowrank", "galore", "sltrain / adamw", "sltrain / 8bit + layerwise"]


def run_variant(name: str, extra: list[str], common: list[str], out: Path) -> dict:
    run_name = name.replace(" ", "").replace("/", "_").replace("(", "").replace(")", "").replace("=", "")
    cmd = [sys.executable, "-m", "sltrain_cli", "pretrain", "--quiet", *common, *extra,
           f"out_dir={out}", f"run_name={run_name}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"variant": name, "status": "failed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads((out / "pretrain" / run_name / "summary.json").read_text())
    return {"variant": name, **summary}


def measured_alloc_peak(extra: list[str], common: list[str], batch: int, seq: int) -> float | None:
    """Peak live torch allocations (MB) for 3 steps of the same model, method and optimizer."""
    from sltrain_cli.compose import load_config
    from sltrain_cli.measure import measure_memory

    cfg = load_config([*common, *extra])
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size)
    res = measure_memory(model_cfg, cfg.method, optimizer="adam8bit" if cfg.optim.name.value == "adamw8bit" else "adam",
                         layerwise=cfg.train.layerwise, batch_size=batch, seq_len=seq, steps=3, device="cpu",
                         precision="fp32")
    return res["peak_bytes"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(QUICK))
    args = ap.parse_args()

    common = [f"model={args.model}", f"steps={args.steps}", f"rank={args.rank}", f"data.seq_len={args.seq_len}",
              f"train.total_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.eval_every=0",
              "train.save_every=0", "train.eval_tokens=32768", "train.device=cpu", "lr=3e-3"]
    names = QUICK if args.quick else list(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"running {name} ...", flush=True)
            row = run_variant(name, VARIANTS[name], common, Path(tmp))
            if row.get("status") == "completed":
                row["alloc_peak_mb"] = measured_alloc_peak(VARIANTS[name], common, args.batch, args.seq_len)
            rows.append(row)

    ref = next((r for r in rows if r["variant"] == "full / adamw" and r.get("status") == "completed"), None)
    head = ("variant", "params (M)", "trainable (M)", "opt state MB (x)", "peak RSS MB", "alloc peak MB (x)",
            "tokens/s (x)", "val ppl")
    print(f"\nmodel={args.model} steps={args.steps} batch={args.batch}x{args.seq_len} rank={args.rank} "
          f"(ratios to full / adamw)\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        if r.get("status") != "completed":
            print(f"| {r['variant']} | failed: {r.get('error')} |")
            continue
        ratio = lambda k, r=r: f" ({r[k] / ref[k]:.2f})" if ref and ref.get(k) else ""  # noqa: E731
        print(f"| {r['variant']} | {r['params_total'] / 1e6:.2f} | {r['params_trainable'] / 1e6:.2f} | "
              f"{r['optimizer_state_bytes'] / 2**20:.1f}{ratio('optimizer_state_bytes')} | "
              f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['alloc_peak_mb']:.1f}{ratio('alloc_peak_mb')} | "
              f"{r['tokens_per_s']:,.0f}{ratio('tokens_per_s')} | {r['val_ppl']:.1f} |")


if __name__ == "__main__":
    main()
