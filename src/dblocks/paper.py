"""The numbers the paper reports (arXiv 2506.14202, v4), in one place, for the tables that put ours beside them.

``PAPER_TABLES`` maps a table id (``"1"`` .. ``"12"``, and ``"gamma"`` for this project's overlap ablation,
for which the paper prints no numbers) to one dict:

- ``title``: what the table shows; ``setting``: the paper's model and data; ``metric``: the quantity and unit;
  ``better``: ``"higher"`` or ``"lower"``;
- ``kind``: how our runs are placed in it (``dblocks.tables`` reads this):
  ``methods`` (one row per training method, ``key = {"method": ...}``, a ``pipeline.methods`` value: DiffusionBlocks'
  blockwise / e2e, or a block-local baseline such as forward-forward or noprop-dt, whose row is filled by the
  experiment that trains it; ``"method": None`` marks a method we do not run), ``grid`` (rows by ``layer_split``,
  columns by ``partition``),
  ``sweep`` (rows by the parameter named in ``param``: ``blocks`` or ``overlap``), ``timing`` (Table 12);
- ``columns``: ordered ``{column key: header}`` of the paper's value columns;
- ``settings`` (optional): ``{setting key: {"label", "match"}}`` where one table holds several datasets; a
  row's ``key["setting"]`` names one, and an experiment is placed in the setting whose ``match`` words occur
  in its dataset (else its name);
- ``rows``: ``{"label", "key", "values": {column key: number or None}}``; ``None`` = not reported;
- ``notes`` (optional): remarks printed under the table.

Nothing here is computed from our runs; only ``PAPER_TABLES`` and the small helpers below live here."""

from __future__ import annotations

from typing import Any

#: the paper's Table 12 per-iteration wall times, seconds (12-layer ViT, B=3 blocks of 4 layers)
_T12_E2E, _T12_BLOCK, _T12_SUM = 0.0507, 0.0181, 0.0543

PAPER_TABLES: dict[str, dict[str, Any]] = {
    "1": {
        "title": "Image classification: ViT on CIFAR-100, test accuracy (%)",
        "setting": "ViT, 12 layers, d=128, 4 heads, patch 4; CIFAR-100",
        "metric": "accuracy (%)",
        "better": "higher",
        "kind": "methods",
        "columns": {"accuracy": "accuracy (%)"},
        "rows": [
            {"label": "End-to-end backprop", "key": {"method": "e2e"}, "values": {"accuracy": 60.25}},
            {"label": "DiffusionBlocks", "key": {"method": "blockwise"}, "values": {"accuracy": 59.30}},
            {"label": "Forward-Forward", "key": {"method": "forward-forward"}, "values": {"accuracy": 7.85}},
        ],
    },
    "2": {
        "title": "Image generation: DiT, FID (lower is better)",
        "setting": "DiT-S/2 on CIFAR-10; DiT-L/2 on ImageNet 256 (sd-vae-ft-ema latents, CFG 2.0); 50k samples",
        "metric": "FID",
        "better": "lower",
        "kind": "methods",
        "columns": {"fid_train": "FID (train)", "fid_test": "FID (test)"},
        "settings": {
            "cifar10": {"label": "DiT-S/2, CIFAR-10", "match": ["cifar10", "cifar-10", "cifar_10"]},
            "imagenet": {"label": "DiT-L/2, ImageNet 256", "match": ["imagenet"]},
        },
        "rows": [
            {
                "label": "End-to-end backprop",
                "key": {"setting": "cifar10", "method": "e2e"},
                "values": {"fid_train": 32.84, "fid_test": 39.83},
            },
            {
                "label": "DiffusionBlocks",
                "key": {"setting": "cifar10", "method": "blockwise"},
                "values": {"fid_train": 30.59, "fid_test": 37.20},
            },
            {
                "label": "End-to-end backprop",
                "key": {"setting": "imagenet", "method": "e2e"},
                "values": {"fid_train": 9.01, "fid_test": 12.09},
            },
            {
                "label": "DiffusionBlocks",
                "key": {"setting": "imagenet", "method": "blockwise"},
                "values": {"fid_train": 9.00, "fid_test": 10.63},
            },
        ],
    },
    "3": {
        "title": "Masked diffusion language model: text8, bits per character (lower is better)",
        "setting": "MD4-style masked diffusion, 12 layers, d=768, 12 heads, sequence 256; text8",
        "metric": "BPC",
        "better": "lower",
        "kind": "methods",
        "columns": {"bpc": "BPC"},
        "rows": [
            {"label": "End-to-end backprop", "key": {"method": "e2e"}, "values": {"bpc": 1.56}},
            {"label": "DiffusionBlocks", "key": {"method": "blockwise"}, "values": {"bpc": 1.45}},
        ],
    },
    "4": {
        "title": "Autoregressive language model: MAUVE (higher is better) and generative perplexity (lower is better)",
        "setting": "12-layer Llama-style transformer, d=768, B=4, gamma=0.1; LM1B and OpenWebText; "
        "1K prompts x 5 continuations of 50 tokens",
        "metric": "MAUVE / gen. PPL",
        "better": "mixed",
        "kind": "methods",
        "columns": {"mauve": "MAUVE", "gen_ppl_llama2": "gen. PPL (Llama-2)", "gen_ppl_gpt2xl": "gen. PPL (GPT2-XL)"},
        "settings": {
            "lm1b": {"label": "LM1B", "match": ["lm1b"]},
            "owt": {"label": "OpenWebText", "match": ["openwebtext", "owt"]},
        },
        "rows": [
            {
                "label": "End-to-end backprop",
                "key": {"setting": "lm1b", "method": "e2e"},
                "values": {"mauve": 0.50, "gen_ppl_llama2": 14.58, "gen_ppl_gpt2xl": 38.87},
            },
            {
                "label": "DiffusionBlocks",
                "key": {"setting": "lm1b", "method": "blockwise"},
                "values": {"mauve": 0.71, "gen_ppl_llama2": 12.32, "gen_ppl_gpt2xl": 30.99},
            },
            {
                "label": "End-to-end backprop",
                "key": {"setting": "owt", "method": "e2e"},
                "values": {"mauve": 0.85, "gen_ppl_llama2": 15.05, "gen_ppl_gpt2xl": 25.24},
            },
            {
                "label": "DiffusionBlocks",
                "key": {"setting": "owt", "method": "blockwise"},
                "values": {"mauve": 0.82, "gen_ppl_llama2": 14.99, "gen_ppl_gpt2xl": 26.33},
            },
        ],
    },
    "5": {
        "title": "Recurrent-depth (Huginn) language model: LM1B, MAUVE and generative perplexity",
        "setting": "Huginn: 2 prelude, 4-layer recurrent block, 2 coda, d=512, 8 heads; LM1B",
        "metric": "MAUVE / gen. PPL",
        "better": "mixed",
        "kind": "methods",
        "columns": {"mauve": "MAUVE", "gen_ppl_llama2": "gen. PPL (Llama-2)", "gen_ppl_gpt2xl": "gen. PPL (GPT2-XL)"},
        "rows": [
            {
                "label": "End-to-end (stochastic recurrence, truncated BPTT)",
                "key": {"method": "e2e"},
                "values": {"mauve": 0.49, "gen_ppl_llama2": 17.04, "gen_ppl_gpt2xl": 46.73},
            },
            {
                "label": "DiffusionBlocks",
                "key": {"method": "blockwise"},
                "values": {"mauve": 0.70, "gen_ppl_llama2": 16.08, "gen_ppl_gpt2xl": 42.43},
            },
        ],
    },
    "6": {
        "title": "Comparison with NoProp: CIFAR-100, test accuracy (%)",
        "setting": "NoProp's setup on CIFAR-100; DiffusionBlocks and backprop on the ViT, B=3, overlap 0.1 (docs/noprop.md)",
        "metric": "accuracy (%)",
        "better": "higher",
        "kind": "methods",
        "columns": {"accuracy": "accuracy (%)"},
        "rows": [
            {"label": "Backprop", "key": {"method": "e2e"}, "values": {"accuracy": 47.80}},
            {"label": "NoProp-DT", "key": {"method": "noprop-dt"}, "values": {"accuracy": 46.06}},
            {"label": "NoProp-CT", "key": {"method": "noprop-ct"}, "values": {"accuracy": 21.31}},
            {"label": "NoProp-FM", "key": {"method": "noprop-fm"}, "values": {"accuracy": 37.57}},
            {"label": "DiffusionBlocks", "key": {"method": "blockwise"}, "values": {"accuracy": 46.88}},
        ],
    },
    "7": {
        "title": "Partition x layer split: CIFAR-10 FID at gamma=0 (lower is better)",
        "setting": "DiT-S/2 on CIFAR-10, B=3, overlap gamma=0",
        "metric": "FID",
        "better": "lower",
        "kind": "grid",
        "columns": {"uniform": "uniform", "equiprobable": "equi-probability"},
        "rows": [
            {
                "label": "[4, 4, 4]",
                "key": {"layer_split": (4, 4, 4)},
                "values": {"uniform": 43.53, "equiprobable": 38.03},
            },
            {
                "label": "[3, 6, 3]",
                "key": {"layer_split": (3, 6, 3)},
                "values": {"uniform": 43.59, "equiprobable": 41.64},
            },
            {
                "label": "[6, 4, 2]",
                "key": {"layer_split": (6, 4, 2)},
                "values": {"uniform": 47.49, "equiprobable": 45.42},
            },
            {
                "label": "[2, 4, 6]",
                "key": {"layer_split": (2, 4, 6)},
                "values": {"uniform": 42.37, "equiprobable": 40.40},
            },
        ],
    },
    "8": {
        "title": "Block count B: ImageNet 256 FID (lower is better)",
        "setting": "DiT-L/2 on ImageNet 256; B=1 is the end-to-end model",
        "metric": "FID",
        "better": "lower",
        "kind": "sweep",
        "param": "blocks",
        "param_label": "B",
        "columns": {"fid": "FID"},
        "rows": [
            {"label": str(b), "key": {"blocks": b}, "values": {"fid": v}}
            for b, v in ((1, 12.09), (2, 9.90), (3, 11.11), (4, 11.90), (6, 14.43))
        ],
    },
    "10": {
        "title": "Block count B: CIFAR-10 FID (lower is better)",
        "setting": "DiT-S/2 on CIFAR-10; B=1 is the end-to-end model",
        "metric": "FID",
        "better": "lower",
        "kind": "sweep",
        "param": "blocks",
        "param_label": "B",
        "columns": {"fid": "FID"},
        "rows": [
            {"label": str(b), "key": {"blocks": b}, "values": {"fid": v}}
            for b, v in ((1, 39.83), (2, 35.47), (3, 38.03), (4, 45.43), (6, 53.32))
        ],
    },
    "11": {
        "title": "Block count B: LM1B MAUVE (higher is better)",
        "setting": "12-layer autoregressive transformer on LM1B",
        "metric": "MAUVE",
        "better": "higher",
        "kind": "sweep",
        "param": "blocks",
        "param_label": "B",
        "columns": {"mauve": "MAUVE"},
        "rows": [
            {"label": str(b), "key": {"blocks": b}, "values": {"mauve": v}}
            for b, v in ((2, 0.61), (3, 0.65), (4, 0.67), (6, 0.62))
        ],
    },
    "12": {
        "title": "Wall-clock time per training iteration (seconds)",
        "setting": "12-layer ViT: end-to-end vs one 4-layer block (B=3)",
        "metric": "seconds per iteration",
        "better": "lower",
        "kind": "timing",
        "columns": {"seconds": "s / iteration"},
        "rows": [
            {"label": "End-to-end", "key": {"row": "e2e"}, "values": {"seconds": _T12_E2E}},
            {"label": "one block", "key": {"row": "block"}, "values": {"seconds": _T12_BLOCK}},
            {"label": "sum over blocks", "key": {"row": "sum"}, "values": {"seconds": _T12_SUM}},
            {
                "label": "ratio sum / end-to-end",
                "key": {"row": "ratio"},
                "values": {"seconds": round(_T12_SUM / _T12_E2E, 3)},
            },
        ],
        "notes": [
            "The paper reports 0.0181 s for one 4-layer block and 0.0543 s for three; the ratio "
            "0.0543 / 0.0507 is derived here, not printed in the paper."
        ],
    },
    "gamma": {
        "title": "Overlap ablation: FID vs training overlap gamma (lower is better)",
        "setting": "the paper discusses the overlap gamma but prints no table of numbers for this ablation",
        "metric": "FID",
        "better": "lower",
        "kind": "sweep",
        "param": "overlap",
        "param_label": "gamma",
        "columns": {"fid": "FID"},
        "rows": [{"label": str(g), "key": {"overlap": g}, "values": {"fid": None}} for g in (0.0, 0.05, 0.1)],
    },
}


def table_ids() -> list[str]:
    """All table ids, numeric ones first in numeric order."""
    return sorted(PAPER_TABLES, key=table_sort_key)


def table_sort_key(table_id: str) -> tuple:
    return (0, int(table_id), "") if str(table_id).isdigit() else (1, 0, str(table_id))


def paper_value(table_id: str, column: str, **key: Any) -> float | None:
    """The paper's number in one cell, e.g. ``paper_value("7", "uniform", layer_split=(4, 4, 4))``."""
    for row in PAPER_TABLES[str(table_id)]["rows"]:
        if all(row["key"].get(k) == v for k, v in key.items()):
            return row["values"].get(column)
    raise KeyError(f"table {table_id}: no row with {key}")
