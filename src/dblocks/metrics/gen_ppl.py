"""Generative perplexity of decoded continuations under a pretrained Hugging Face causal LM (the paper's
judges: Llama-2 and GPT2-XL). Needs the network (or a populated Hugging Face cache) and ``transformers``;
offline, the pipeline judges with its own end-to-end reference LM instead
(dblocks.text_generation.continuation_nll, labelled so)."""

from __future__ import annotations

import math

import torch

#: judge name -> (Hugging Face model id, metric name the tables read)
HF_JUDGES = {
    "gpt2-xl": ("openai-community/gpt2-xl", "gen_ppl_gpt2xl"),
    "llama2": ("meta-llama/Llama-2-7b-hf", "gen_ppl_llama2"),
}


@torch.no_grad()
def hf_generative_perplexity(prompts: list[str], continuations: list[str], judge: str) -> float:
    """exp(mean NLL per judge token of each continuation given its prompt), one sequence at a time (no
    padding, so nothing depends on the judge's padding side)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if judge not in HF_JUDGES:
        raise ValueError(f"unknown judge {judge!r}; allowed: {', '.join(HF_JUDGES)}")
    model_id = HF_JUDGES[judge][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = (
        AutoModelForCausalLM.from_pretrained(
            model_id, torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32
        )
        .to(device)
        .eval()
    )
    nll, count = 0.0, 0
    for prompt, continuation in zip(prompts, continuations):
        p_ids = tokenizer(prompt, return_tensors="pt").input_ids
        c_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
        if c_ids.shape[1] == 0:
            continue
        ids = torch.cat([p_ids, c_ids], dim=1).to(device)
        logits = model(ids).logits[0, p_ids.shape[1] - 1 : -1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, p_ids.shape[1] :], reduction="sum").item()
        count += c_ids.shape[1]
    if count == 0:
        raise ValueError("every continuation was empty after the judge's tokenizer")
    return math.exp(nll / count)
