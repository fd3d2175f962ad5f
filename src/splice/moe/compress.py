"""``splice moe-compress``: merge a MoE's experts into fewer, after M-SMoE ("Merge, Then Compress").

Per layer:

1. run calibration text through the model; count how often each expert is in a
   token's top-k (usage) and keep every token's router logits;
2. the ``K`` most used experts lead one group each; every other expert joins
   the leader whose router-logit column is most similar (cosine over tokens);
3. each member's MLP units are permuted to line up with the leader's
   (maximum-weight matching on the concatenated gate/up rows and down columns);
4. each group becomes one expert: the usage-weighted average of its aligned
   members (equal weights if no member was used); its router row is the leader's.

Everything else (attention, norms, embeddings, a shared expert) is copied.
"""

from __future__ import annotations

import re
import threading
import time
from functools import partial
from pathlib import Path

import torch

from .. import architecture as arch
from ..checkpoint import SideFiles, open_model
from ..checkpoint.writer import check_output
from ..engine.write import Entry, torch_threads, write_checkpoint
from ..errors import RecipeError, option
from .assignment import max_weight_matching
from .families import PROJS, Family, family_of_moe

# ---------------------------------------------------------------- pure steps


def group_experts(usage: torch.Tensor, logits: torch.Tensor, k: int) -> list[list[int]]:
    """Groups of expert indices, leader first, groups ordered by leader index.

    ``usage[e]``: how often expert e was chosen; ``logits``: ``[tokens, experts]`` router logits.
    """
    n = usage.shape[0]
    order = sorted(range(n), key=lambda i: (-float(usage[i]), i))
    leaders = sorted(order[:k])
    x = logits.to(torch.float64)
    x = x / x.norm(dim=0, keepdim=True).clamp(min=1e-12)
    sim = x.T @ x  # [experts, experts] cosine of logit columns
    groups = {l: [l] for l in leaders}
    for e in order[k:]:
        best = max(leaders, key=lambda l: (float(sim[e, l]), -l))
        groups[best].append(e)
    return [groups[l] for l in leaders]


def align(leader: dict[str, torch.Tensor], member: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``member`` with its MLP units permuted to match ``leader``'s (weights gate/up [I,H], down [H,I])."""
    fl = torch.cat([leader["gate"], leader["up"], leader["down"].T], dim=1).to(torch.float64)
    fm = torch.cat([member["gate"], member["up"], member["down"].T], dim=1).to(torch.float64)
    perm = torch.from_numpy(max_weight_matching((fl @ fm.T).numpy()))
    return {"gate": member["gate"][perm], "up": member["up"][perm], "down": member["down"][:, perm]}


def merge_group(members: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Usage-weighted average of the members aligned to the first (the leader)."""
    w = torch.tensor(weights, dtype=torch.float64)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    w = w / w.sum()
    aligned = [members[0]] + [align(members[0], m) for m in members[1:]]
    return {p: sum(float(wi) * a[p].to(torch.float64) for wi, a in zip(w, aligned)).to(torch.float32) for p in PROJS}


# ---------------------------------------------------------------- routing statistics


def routing_stats(model, sequences: list[list[int]], top_k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: usage counts ``[experts]`` (top-k picks) and router logits ``[tokens, experts]``."""
    usage: list[torch.Tensor] = []
    logits: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for seq in sequences:
            out = model(input_ids=torch.tensor([seq]), output_router_logits=True, use_cache=False)
            rl = out.router_logits
            if not logits:
                logits = [[] for _ in rl]
                usage = [torch.zeros(r.shape[-1]) for r in rl]
            for l, r in enumerate(rl):
                r = r.reshape(-1, r.shape[-1]).float()
                logits[l].append(r)
                top = r.topk(min(top_k, r.shape[-1]), dim=-1).indices.reshape(-1)
                usage[l] += torch.bincount(top, minlength=r.shape[-1]).float()
    return usage, [torch.cat(x) for x in logits]


# ---------------------------------------------------------------- the command


def _expert_tensors(src, fam: Family, prefix: str, layer: int, e: int) -> dict[str, torch.Tensor]:
    return {p: src.get(fam.expert_name(prefix, layer, e, p)).to(torch.float32) for p in PROJS}


class _GroupMerge:
    """One group's merged expert, computed once (by whichever of its three projections is written
    first) and handed out projection by projection; freed when all three are taken."""

    def __init__(self, src, fam: Family, prefix: str, layer: int, members: list[int], usage: list[float]):
        self._make = lambda: merge_group([_expert_tensors(src, fam, prefix, layer, e) for e in members], usage)
        self._lock = threading.Lock()
        self._merged: dict[str, torch.Tensor] | None = None
        info = src.info(fam.expert_name(prefix, layer, 0, "gate"))
        # every member's three projections in float32 and float64 while merging, and the result
        self.memory = 3 * info.numel * (4 + 8) * (len(members) + 1)

    def take(self, proj: str) -> torch.Tensor:
        with self._lock:
            if self._merged is None:
                self._merged = self._make()
            t = self._merged.pop(proj)
            if not self._merged:
                self._make = None  # all three taken: nothing of the group stays alive
            return t


def compress_moe(
    moe: str | Path,
    out: str | Path,
    *,
    experts: int,
    calibration: list[str | Path],
    tokens: int = 4096,
    seq_len: int = 256,
    seed: int = 0,
    force: bool = False,
    shard_size: int | str = "5GB",
    quiet: bool = False,
    threads: int | None = None,
    write_card: bool = True,
    workers: int | None = None,
    tune_malloc: bool = False,
) -> dict:
    from ..hf import load_causal_lm, source_tokenizer
    from .calibrate import read_documents, token_sequences

    t0 = time.time()
    src = open_model(moe)
    try:
        fam = family_of_moe(src.config, str(moe))
        cfg = arch.text_config(src.config)
        n = cfg.get(fam.expert_key)
        if not isinstance(n, int) or n < 1:
            raise RecipeError(f"{moe}: config.json has no {fam.expert_key}")
        if isinstance(experts, bool) or not isinstance(experts, int) or not 1 <= experts <= n:
            raise RecipeError(f"{option('experts', experts)}: must be between 1 and {n} (the experts {moe} has)")
        top_k = int(cfg.get("num_experts_per_tok", 2))
        check_output(out, force=force, inputs=[src.path, *calibration])
        routers = {}
        for name in src.keys():
            role = arch.classify(name)
            if role.layer is not None and name == fam.router_name(role.prefix, role.layer):
                routers[role.layer] = (role.prefix, name)
        layers = arch.num_layers(src.config, src.keys())
        if sorted(routers) != list(range(layers)):
            raise RecipeError(f"{moe}: expected a router in each of its {layers} layers (per-expert tensor layout), found {len(routers)}")
        prefix = routers[0][0]
        docs = []
        for f in calibration:
            p = Path(f)
            if not p.is_file():
                raise RecipeError(f"calibration file {str(f)!r} not found")
            docs += read_documents(p)
        if not docs:
            raise RecipeError("the calibration files hold no text")
        tok = source_tokenizer(src, "moe-compress needs the model's tokenizer")
        seqs = token_sequences(tok, docs, tokens=tokens, seq_len=seq_len, seed=seed)
        if not seqs:
            raise RecipeError("the calibration text is too short (no document has 4 tokens or more)")
        with torch_threads(threads):  # restored after: a library call leaves the host's setting alone
            model = load_causal_lm(src, dtype=torch.float32)
            usage, logits = routing_stats(model, seqs, top_k)
            del model
        n_tokens = int(logits[0].shape[0])
        groups = [group_experts(usage[l], logits[l], experts) for l in range(layers)]

        entries: list[Entry] = []
        for name in src.keys():
            if re.search(r"\.experts\.\d+\.", name) or name in {r[1] for r in routers.values()}:
                continue
            info = src.info(name)
            entries.append(Entry(name, info.dtype, tuple(info.shape), partial(src.get, name), info.nbytes, check_finite=False))
        for l in range(layers):
            rname = routers[l][1]
            info = src.info(rname)
            lead = [g[0] for g in groups[l]]
            entries.append(
                Entry(rname, info.dtype, (experts, info.shape[1]), (lambda rname=rname, lead=lead: src.get(rname)[lead]), info.nbytes)
            )
            for gi, g in enumerate(groups[l]):
                merged = _GroupMerge(src, fam, prefix, l, g, [float(usage[l][e]) for e in g])
                for proj in PROJS:
                    info = src.info(fam.expert_name(prefix, l, 0, proj))
                    entries.append(
                        Entry(
                            fam.expert_name(prefix, l, gi, proj), info.dtype, tuple(info.shape), partial(merged.take, proj), merged.memory
                        )
                    )

        new_cfg = dict(src.config)
        new_cfg[fam.expert_key] = experts
        new_cfg["num_experts_per_tok"] = min(top_k, experts)
        summary = {
            "experts_before": n,
            "experts": experts,
            "tokens": n_tokens,
            "groups": groups,
            "usage": [(u / u.sum().clamp(min=1)).tolist() for u in usage],
        }
        card = None
        if write_card:
            from .card import compress_card

            def card(hashes: dict[str, str], _tokenizer_files: list[str]) -> str:
                return compress_card(str(moe), summary, hashes)

        side = SideFiles(
            config=new_cfg, model=str(moe), tokenizer_dir=src.tokenizer_dir(), generation_config=src.generation_config(), card=card
        )
        written = write_checkpoint(
            out,
            entries,
            side,
            inputs=[src.path, *calibration],
            force=force,
            shard_size=shard_size,
            workers=workers,
            threads=threads,
            tune_malloc=tune_malloc,
            label="moe-compress",
            quiet=quiet,
        )
    finally:
        src.close()
    summary.update(out=str(written), seconds=time.time() - t0)
    return summary
