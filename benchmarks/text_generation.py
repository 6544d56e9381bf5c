"""Tokens per second of text generation with and without the KV cache (dblocks.layers.KVCache).

The four generators of the tiny text DAG (params/tiny-text.yaml) at its sizes: AR-tiny's end-to-end baseline
(``generate_baseline``, top-p) and its block-wise model (``generate_blockwise``, B=4, one Euler step per block),
and Huginn-tiny end-to-end and block-wise (``generate_recurrent``, K=8 iterations / Euler steps), each with
``cache=True`` (each token runs its new positions only) and ``cache=False`` (the whole context at every step),
interleaved (cached, full, cached, ...) after a warm-up round. A prompt of 14 tokens and 50 new tokens, as the
DAG's evaluation. Reported: median and IQR seconds per call, tokens/s (batch x new tokens / median) and the
speed-up (full / cached). Whether both gave the same tokens is recorded too (the AR generators keep the full
recompute's tokens; Huginn's are the same given each position's kept start, see ``generate_recurrent``).

Models are untrained (timing does not depend on the weights); prompts are random tokens.

Command (from the repository root; about 3 minutes of CPU on 2 cores, single-threaded)::

    .venv/bin/python benchmarks/text_generation.py
    .venv/bin/python benchmarks/text_generation.py --batch 250 --reps 1   # the DAG's 50 prompts x 5 continuations

Writes results/bench/text_generation.json and results/bench/text_generation.png and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from dblocks.blocks import AssembledModel  # noqa: E402
from dblocks.text_generation import generate_baseline, generate_blockwise, generate_recurrent  # noqa: E402

AR = ("ar_text", "AR-tiny", "shakespeare")
HUGINN = ("recurrent_text", "Huginn-tiny", "shakespeare")


def generators(device: torch.device, blocks: int):
    """name -> (model, call(model, prompts, new_tokens, generator, cache)) for the four generators."""
    ar, huginn = C.experiment(AR, blocks), C.experiment(HUGINN, 1)
    k = huginn.arch.spec.recurrence

    def recurrent(m, p, n, g, cache):
        return generate_recurrent(m, p, n, k, g, cache=cache)

    def baseline(m, p, n, g, cache):
        return generate_baseline(m, p, n, g, cache=cache)

    def blockwise(m, p, n, g, cache):
        return generate_blockwise(m, p, n, g, cache=cache)

    models = {
        "AR-tiny e2e": (ar.e2e(), baseline),
        f"AR-tiny block-wise B={blocks}": (AssembledModel(ar.empty_blocks(), ar.partition), blockwise),
        f"Huginn-tiny e2e K={k}": (huginn.e2e(), recurrent),
        f"Huginn-tiny block-wise K={k}": (AssembledModel(huginn.empty_blocks(), huginn.partition), recurrent),
    }
    return {name: (model.to(device).eval(), call) for name, (model, call) in models.items()}


def measure(
    batch: int, prompt: int, new_tokens: int, blocks: int, reps: int, warmup: int, device: torch.device
) -> list[dict]:
    prompts = torch.randint(0, 257, (batch, prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, (model, call) in generators(device, blocks).items():
        outputs = {}

        def job(cache):
            def run():
                # called within this iteration (by the timing loop below): the loop's values are the ones meant
                outputs[cache] = call(model, prompts, new_tokens, torch.Generator().manual_seed(1), cache)  # noqa: B023

            return run

        print(f"  {name}", flush=True)
        times = C.interleaved({"cached": job(True), "full": job(False)}, reps, warmup, device)
        stats = {mode: C.summarize(ts) for mode, ts in times.items()}
        rows.append(
            {
                "generator": name,
                "batch": batch,
                "prompt": prompt,
                "new_tokens": new_tokens,
                "reps": reps,
                "seconds": stats,
                "times": times,
                "tokens_per_second": {m: batch * new_tokens / s["median"] for m, s in stats.items()},
                "speedup": stats["full"]["median"] / stats["cached"]["median"],
                "same_tokens": bool(torch.equal(outputs[True], outputs[False])),
            }
        )
    return rows


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(rows))
    for i, mode in enumerate(("full", "cached")):
        ax.bar(
            [j + (i - 0.5) * 0.4 for j in x],
            [r["tokens_per_second"][mode] for r in rows],
            0.4,
            label="full recompute" if mode == "full" else "KV cache",
        )
    ax.set_xticks(list(x), [f"{r['generator']}\nx{r['speedup']:.1f}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s (median)")
    ax.legend(fontsize=8)
    dev = record["device"]
    r0 = rows[0]
    ax.set_title(
        f"Text generation, batch {r0['batch']}, prompt {r0['prompt']}, {r0['new_tokens']} new tokens: "
        f"{dev['device']} ({dev['torch_threads']} thread(s))",
        fontsize=9,
    )
    return C.save_figure(fig, "text_generation")


def print_tables(record: dict) -> None:
    rows = [
        {
            "generator": r["generator"],
            "full_tok_s": r["tokens_per_second"]["full"],
            "cached_tok_s": r["tokens_per_second"]["cached"],
            "speedup": r["speedup"],
            "full_iqr_s": r["seconds"]["full"]["iqr"],
            "cached_iqr_s": r["seconds"]["cached"]["iqr"],
            "same_tokens": r["same_tokens"],
        }
        for r in record["rows"]
    ]
    print(
        C.format_table(
            rows, ["generator", "full_tok_s", "cached_tok_s", "speedup", "full_iqr_s", "cached_iqr_s", "same_tokens"]
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="prompts generated at once (the DAG: 250)")
    p.add_argument("--prompt", type=int, default=14, help="prompt tokens (the DAG: 64 - 50)")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--blocks", type=int, default=4, help="AR block-wise B (the DAG's ar-lm1b: 4)")
    C.timing_arguments(p, reps=3, warmup=1)
    args = p.parse_args(argv)
    device = C.timing_device(args)
    record = C.start_record("text_generation", device, argv)
    t0 = time.perf_counter()
    print(f"text generation, batch {args.batch}, {args.new_tokens} new tokens, {args.reps} reps", flush=True)
    record["rows"] = measure(args.batch, args.prompt, args.new_tokens, args.blocks, args.reps, args.warmup, device)
    return C.finish("text_generation", record, t0, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
