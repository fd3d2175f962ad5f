"""The base model in memory with one expert's MLPs swapped in, to see what each router sees.

With every token of an expert's text routed to that expert (top-1), the MoE
computes exactly the base's attention with that expert's MLPs. Running that
dense model and recording the input of each layer's MLP (after the
post-attention norm) gives the router inputs per layer in one pass. Used by the
``hidden`` gate initialiser and by router calibration.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, RecipeError
from .experts import expert_tensor


def load_tokenizer(src, what: str):
    d = src.tokenizer_dir()
    if d is None:
        raise CheckpointError(f"model {src.name}: no tokenizer files found ({what} needs the base's tokenizer)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - any failure means the files are unusable
        raise CheckpointError(f"model {src.name}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


def encode(tok, text: str, max_len: int) -> list[int]:
    """Token ids of ``text`` with the tokenizer's BOS in front (as mergekit does), at most ``max_len``."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None:
        ids = [bos] + list(ids)
    return list(ids[:max_len])


class DenseRunner:
    """``base`` as a transformers model (float32); ``use_expert`` swaps its MLPs for a donor's."""

    def __init__(self, base_src, prefix: str, *, threads: int | None = None):
        import transformers as tf

        if threads:
            torch.set_num_threads(threads)
        cfg_dict = {k: v for k, v in base_src.config.items() if k not in ("quantization_config",)}
        try:
            config = tf.AutoConfig.for_model(**cfg_dict)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"model {base_src.name}: transformers cannot read its config ({e})") from None
        config._attn_implementation = "sdpa"
        self.model = tf.AutoModelForCausalLM.from_config(config).to(torch.float32)
        self.model.eval()
        state = {}
        own = self.model.state_dict()
        for name in base_src.keys():
            if name in own:
                state[name] = base_src.get(name).to(torch.float32)
        missing = [k for k in own if k not in state and not k.endswith("lm_head.weight")]
        if missing:
            raise CheckpointError(f"model {base_src.name}: tensor {missing[0]!r} missing for the in-memory model")
        self.model.load_state_dict(state, strict=False)
        if "lm_head.weight" in own and "lm_head.weight" not in state:
            self.model.tie_weights()
        self.prefix = prefix
        self.layers = self.model.get_decoder().layers
        self.hidden = config.hidden_size
        self.max_len = int(getattr(config, "max_position_embeddings", 2048) or 2048)

    def use_expert(self, src, expert, slot: str, seed: int) -> None:
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for proj in ("gate", "up", "down"):
                    w = expert_tensor(src, expert, slot, self.prefix, i, proj, seed)
                    getattr(layer.mlp, f"{proj}_proj").weight.copy_(w)

    def router_inputs(self, sequences: list[list[int]], skip_first: bool, batch: int = 8) -> list[torch.Tensor]:
        """Per layer, the MLP inputs of every token of every sequence: ``[n_tokens, hidden]``."""
        store: list[list[torch.Tensor]] = [[] for _ in self.layers]
        hooks = []
        for i, layer in enumerate(self.layers):

            def hook(_mod, args, i=i):
                x = args[0]  # [batch, seq, hidden]
                store[i].append(x[:, self._skip :].reshape(-1, x.shape[-1]).detach().clone())

            hooks.append(layer.mlp.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                # sequences of equal length run together (no padding, so nothing to mask out)
                by_len: dict[int, list[list[int]]] = {}
                for seq in sequences:
                    if len(seq) > (1 if skip_first else 0):
                        by_len.setdefault(len(seq), []).append(seq)
                for n in sorted(by_len):
                    group = by_len[n]
                    for b in range(0, len(group), batch):
                        chunk = group[b : b + batch]
                        self._skip = 1 if skip_first else 0
                        self.model.get_decoder()(input_ids=torch.tensor(chunk), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if not store[0]:
            raise RecipeError("no tokens to compute router inputs from (empty prompts?)")
        return [torch.cat(s) for s in store]
