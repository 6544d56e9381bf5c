"""dblocks.optim: torch's AdamW, bit for bit, without importing torch._dynamo (torch.compile's ~1.2 s import)
in a process that compiles nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import dblocks.optim as optim

#: run in a fresh interpreter: the training path of a job (model, optimizer, LR schedule, grad clipping, a state
#: save and a resume, then dblocks.train.train itself with a resume state), then the same steps with torch's own
#: AdamW (which imports torch._dynamo), then ours again with torch._dynamo loaded
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from dblocks import optim

    def loop(make, steps=7, resume_at=4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
        factor = lambda step: min(1.0, (step + 1) / 3)
        opt = make(model.parameters(), lr=1e-2, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            if step == resume_at:  # resume: a new optimizer and schedule from the saved states
                state, sched_state = opt.state_dict(), sched.state_dict()
                opt = make(model.parameters(), lr=1e-2, weight_decay=0.05)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
                opt.load_state_dict(state)
                sched.load_state_dict(sched_state)
            x = torch.randn(32, 6, generator=gen)
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            sched.step()
        state = opt.state_dict()
        return {"params": [p.detach().clone() for p in model.parameters()],
                "state": {f"{i}.{k}": v.clone() if torch.is_tensor(v) else v
                          for i, s in state["state"].items() for k, v in s.items()},
                "groups": state["param_groups"], "lr": sched.get_last_lr(), "type": type(opt).__name__,
                "is_adamw": isinstance(opt, torch.optim.AdamW)}

    def same(a, b):
        def eq(x, y):
            return torch.equal(x, y) if torch.is_tensor(x) else x == y
        return (all(eq(x, y) for x, y in zip(a["params"], b["params"])) and a["state"].keys() == b["state"].keys()
                and all(eq(a["state"][k], b["state"][k]) for k in a["state"]) and a["groups"] == b["groups"]
                and a["lr"] == b["lr"])

    out = {}
    ours = loop(optim.adamw)
    out["ours_is_adamw"] = ours["is_adamw"]

    # the training loop itself, with a resume state saved at step 2 and resumed from
    from dblocks.config import resolve
    from dblocks.experiment import Experiment
    from dblocks.train import train
    from dblocks.jobs import training_job
    exp = Experiment(resolve({"task": "generation", "arch": "DiT-micro", "blocks": 3, "device": "cpu",
                              "train": {"steps": 4, "batch_size": 8, "warmup": 1, "log_every": 2,
                                        "checkpoint_every": 2}}))
    data, state = exp.load_data("train"), Path(sys.argv[1])
    module, objective, _ = training_job(exp, "blockwise", 1)
    train(module, objective, data, exp.config["train"], seed=0, device=torch.device("cpu"), state_path=state,
          steps=3, progress=False)
    module, objective, _ = training_job(exp, "blockwise", 1)
    out["resumed_from"] = train(module, objective, data, exp.config["train"], seed=0, device=torch.device("cpu"),
                                state_path=state, progress=False).resumed_from
    out["dynamo_after_ours"] = "torch._dynamo" in sys.modules
    out["mlflow_after_ours"] = "mlflow" in sys.modules

    stock = loop(torch.optim.AdamW)
    out["stock_type"] = stock["type"]
    out["dynamo_after_stock"] = "torch._dynamo" in sys.modules
    out["same_as_stock"] = same(ours, stock)
    again = loop(optim.adamw)  # torch._dynamo is loaded now: torch's own wrappers run
    out["same_with_dynamo_loaded"] = same(again, stock)
    found = optim._internals()  # torch has patched AdamW.step with its profiler hook by now
    out["internals_after_patching"] = found is not None and found[1] is optim._INTERNALS[1]
    print(json.dumps(out))
""")


def test_adamw_is_torchs_bit_for_bit_without_importing_dynamo(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state.safetensors")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ours_is_adamw"] and out["stock_type"] == "AdamW"
    assert out["resumed_from"] == 2  # train() saved its state (state_dict) and resumed from it (load_state_dict)
    assert out["dynamo_after_ours"] is False and out["mlflow_after_ours"] is False
    assert out["dynamo_after_stock"] is True  # what this module saves a job: torch's AdamW imports it
    assert out["same_as_stock"] and out["same_with_dynamo_loaded"]
    assert out["internals_after_patching"]


def test_falls_back_to_torchs_adamw_without_the_expected_internals(monkeypatch):
    built = []

    def stock(params, **kwargs):  # stands in for torch.optim.AdamW (building one would import torch._dynamo here)
        built.append((params, kwargs))
        return "stock"

    monkeypatch.setattr(optim, "_INTERNALS", None)
    monkeypatch.setattr(torch.optim, "AdamW", stock)
    params = [torch.zeros(2, requires_grad=True)]
    assert optim.adamw(params, lr=1e-3, weight_decay=0.1) == "stock"
    assert built == [(params, {"lr": 1e-3, "weight_decay": 0.1})]
