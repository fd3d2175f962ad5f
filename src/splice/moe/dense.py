"""The base model in memory with one expert's MLPs swapped in, to see what each router sees.

With every token of an expert's text routed to that expert (top-1), the MoE
computes exactly the base's attention with that expert's MLPs. Running that
dense model and recording the input of each layer's MLP (after the
post-attention norm) gives the router inputs per layer in one pass. Used by the
``hidden`` gate initialiser and by router calibration.
"""

from __future__ import annotations

import torch

from .. import architecture as arch
from ..errors import RecipeError
from .experts import expert_tensor


def encode(tok, text: str, max_len: int) -> list[int]:
    """Token ids of ``text`` with the tokenizer's BOS in front (as mergekit does), at most ``max_len``."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None:
        ids = [bos] + list(ids)
    return list(ids[:max_len])


class DenseRunner:
    """``base`` as a transformers model (float32); ``use_expert`` swaps its MLPs for a donor's."""

    def __init__(self, base_src, prefix: str):
        from ..hf import load_causal_lm

        self.model = load_causal_lm(base_src, dtype=torch.float32)
        self.prefix = prefix
        self.layers = arch.decoder_layers(self.model)
        self.mlps = [arch.sub_block(layer, "mlp") for layer in self.layers]
        config = self.model.config
        self.hidden = config.hidden_size
        self.max_len = int(getattr(config, "max_position_embeddings", 2048) or 2048)

    def use_expert(self, src, expert, slot: str, seed: int) -> None:
        with torch.no_grad():
            for i, mlp in enumerate(self.mlps):
                for proj in ("gate", "up", "down"):
                    w = expert_tensor(src, expert, slot, self.prefix, i, proj, seed)
                    getattr(mlp, f"{proj}_proj").weight.copy_(w)

    def router_inputs(self, sequences: list[list[int]], skip_first: bool, batch: int = 8) -> list[torch.Tensor]:
        """Per layer, the MLP inputs of every token of every sequence: ``[n_tokens, hidden]``."""
        skip = 1 if skip_first else 0
        store: list[list[torch.Tensor]] = [[] for _ in self.mlps]
        hooks = []
        for i, mlp in enumerate(self.mlps):

            def hook(_mod, args, i=i):
                x = args[0]  # [batch, seq, hidden]
                store[i].append(x[:, skip:].reshape(-1, x.shape[-1]).detach().clone())

            hooks.append(mlp.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                # sequences of equal length run together (no padding, so nothing to mask out)
                by_len: dict[int, list[list[int]]] = {}
                for seq in sequences:
                    if len(seq) > skip:
                        by_len.setdefault(len(seq), []).append(seq)
                for n in sorted(by_len):
                    group = by_len[n]
                    for b in range(0, len(group), batch):
                        chunk = group[b : b + batch]
                        self.model.get_decoder()(input_ids=torch.tensor(chunk), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if not store[0]:
            raise RecipeError("no tokens to compute router inputs from (empty prompts?)")
        return [torch.cat(s) for s in store]
