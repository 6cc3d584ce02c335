"""Answer the key-value recall task of ``examples/train_recall.py`` by generation, with the model
that example trained, through the NSA KV cache and the decode step.

    python examples/train_recall.py --device cuda --attention nsa --time-limit 110 --save-model /tmp/recall.pt
    python examples/recall_generate.py /tmp/recall.pt --device cuda
    python examples/recall_generate.py /tmp/recall.pt --check      # also without the cache: must agree

For every held-out sequence (drawn like the training data from the checkpoint's task, with the
held-out seed) the context (noise tokens with the key-value pairs) and the first queried key
are prefilled into an :class:`nsa_cuda.cache.NSACache`; the model's greedy next token is its
answer. Then, key after key, the answer it generated and the next queried key are fed as two
decode steps (``nsa_cuda.decode`` in every layer, on the CUDA kernels on a GPU) and the logits of
the key give the next answer. Each sequence asks every queried key once, so every answer must
come from the context, thousands of tokens back. Prints the accuracy of the generated answers
(chance ``1 / value_vocab``) beside the accuracy of one teacher-forced forward pass over the
same sequences (true answers fed back), and the speed of the decode loop. ``--check``
regenerates every answer by recomputing the whole sequence (no cache) and requires the same
tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_lm import TinyLM, TinyLMConfig  # noqa: E402
from train_recall import RecallTask  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a file written by train_recall.py --save-model")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--num-seqs", type=int, default=64, help="held-out sequences (one batch)")
    p.add_argument("--check", action="store_true", help="also generate without the cache (slow) and compare")
    a = p.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if a.num_seqs < 1:
        p.error("--num-seqs must be >= 1")
    return a


def load(path: str, device: str):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("kind") != "nsa_cuda-train_recall":
        raise SystemExit(f"{path}: not a model saved by train_recall.py --save-model")
    model = TinyLM(TinyLMConfig(**ck["model_config"]))
    model.load_state_dict(ck["state_dict"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the CUDA kernels take bf16 / fp16
    return model.to(device=device, dtype=dtype).eval(), RecallTask(**ck["task"]), ck["eval_seed"]


def recall_sequences(task: RecallTask, n: int, seed: int):
    """Context ``[n, ctx_len]`` and each row's queried keys and their values ``[n, Q]``, every key
    once, in the order of their first query in the task's data."""
    ids, ans, first = task.batch(n, torch.Generator().manual_seed(seed))
    ctx = ids[:, :task.ctx_len]
    keys = ids[:, task.ctx_len::2][first].view(n, task.num_queries)  # Q first queries per row
    vals = ans[first].view(n, task.num_queries)
    return ctx, keys, vals


@torch.no_grad()
def generate_answers(model: TinyLM, ctx, keys, use_cache: bool = True):
    """Greedy answers ``[n, Q]``: after the context, key 1 -> answer 1, then (answer 1, key 2) ->
    answer 2, ... With the cache: one prefill, then two single-token decode steps per key;
    without: the whole sequence recomputed for every answer."""
    n, Q = keys.shape
    if not use_cache:
        seq, out = torch.cat([ctx, keys[:, :1]], 1), []
        for q in range(Q):
            nxt = model(seq)[:, -1].argmax(-1)
            out.append(nxt)
            if q + 1 < Q:
                seq = torch.cat([seq, nxt[:, None], keys[:, q + 1:q + 2]], 1)
        return torch.stack(out, 1)
    cache = model.make_cache(n, ctx.shape[1] + 2 * Q)
    nxt = model(torch.cat([ctx, keys[:, :1]], 1), cache=cache)[:, -1].argmax(-1)  # prefill
    out = [nxt]
    for q in range(1, Q):
        model(nxt[:, None], cache=cache)  # the generated answer (its logits predict a key: unused)
        nxt = model(keys[:, q:q + 1], cache=cache)[:, -1].argmax(-1)
        out.append(nxt)
    return torch.stack(out, 1)


@torch.no_grad()
def teacher_forced_answers(model: TinyLM, ctx, keys, vals):
    """Answers of one forward pass over the context and the true (key, value) pairs."""
    seq = torch.cat([ctx, torch.stack([keys, vals], -1).flatten(1)], 1)
    return model(seq)[:, ctx.shape[1]::2].argmax(-1)


def main(argv=None) -> dict:
    a = parse_args(argv)
    model, task, seed = load(a.checkpoint, a.device)
    ctx, keys, vals = (t.to(a.device) for t in recall_sequences(task, a.num_seqs, seed))
    n, Q = keys.shape
    print(f"{a.checkpoint}: TinyLM {model.cfg.num_layers} x {model.cfg.hidden_size} ({model.cfg.attention}), "
          f"{next(model.parameters()).dtype} on {a.device}; {n} held-out sequences: {task.ctx_len}-token context with "
          f"{task.num_pairs} pairs, {Q} queried keys each; chance {1 / task.value_vocab:.3f}")
    if a.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen = generate_answers(model, ctx, keys)
    if a.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    forced = teacher_forced_answers(model, ctx, keys, vals)
    res = {"accuracy": (gen == vals).float().mean().item(), "forced_accuracy": (forced == vals).float().mean().item(),
           "answers": gen.cpu(), "values": vals.cpu(), "seconds": dt}
    steps = 2 * (Q - 1)
    print(f"generated answers: accuracy {res['accuracy']:.3f} ({(gen == vals).sum().item()} of {n * Q}); "
          f"teacher-forced pass: {res['forced_accuracy']:.3f}")
    print(f"prefill of {n} x {task.ctx_len + 1} tokens + {steps} decode steps of {n} sequences in {dt:.2f} s")
    for b in range(min(n, 2)):
        pairs = ", ".join(f"{k}->{g}{'' if g == v else f' (true {v})'}"
                          for k, g, v in zip(keys[b].tolist(), gen[b].tolist(), vals[b].tolist()))
        print(f"  sequence {b}: {pairs}")
    if a.check:
        ref = generate_answers(model, ctx, keys, use_cache=False)
        res["agreement"] = (ref == gen).float().mean().item()
        print(f"check against generation without a cache: {res['agreement']:.3f} of the answers agree")
        if res["agreement"] < 1.0:
            raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
