"""The embedded default model: a small Llama made locally from a seed, saved as a Hugging Face
folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and cached.

With `train_steps > 0` it is first trained briefly on a short text the project ships
(data/corpus.txt, written for this project), so its answers look like words rather than noise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gateway.config import TinyModelConfig
from gateway.worker.model import LlamaConfig, LlamaForCausalLM
from kernels import reference as ref

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("meshgate.worker")

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_VERSION = "1"  # bump when the way the model is made changes


def tiny_model_folder(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """Path of the cached tiny model for cfg, creating (and training) it if missing."""
    key = json.dumps([_VERSION, dataclasses.asdict(cfg), _corpus_hash()], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(cache_dir).expanduser() / "models" / f"meshgate-tiny-{digest}"
    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        make_tiny_model(tmp, cfg)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _corpus_hash() -> str:
    return hashlib.sha256(CORPUS.read_bytes()).hexdigest()[:12]


def make_tiny_model(folder: Path, cfg: TinyModelConfig) -> None:
    from safetensors.torch import save_file

    tok = _train_tokenizer(cfg.vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE}, indent=2)
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig.from_hf(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    if cfg.train_steps > 0:
        _train(model, tok, cfg.train_steps, seed=cfg.seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    return tok


def dense_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Plain causal forward over (B, L) token ids (training only; serving uses the paged path)."""
    c = model.config
    b, length = ids.shape
    pos = torch.arange(length).repeat(b)
    h = model.model.embed_tokens(ids)  # (B, L, hidden)
    for layer in model.model.decoder_layers():
        att = layer.self_attn
        x = layer.input_layernorm(h).view(b * length, -1)
        q = ref.rotary(att.q_proj(x).view(b * length, c.num_attention_heads, c.head_dim), pos, model.cos_sin)
        k = ref.rotary(att.k_proj(x).view(b * length, c.num_key_value_heads, c.head_dim), pos, model.cos_sin)
        v = att.v_proj(x).view(b * length, c.num_key_value_heads, c.head_dim)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B*L, h, D) -> (B, h, L, D)
            return t.view(b, length, -1, c.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, enable_gqa=True)
        h = h + att.o_proj(o.transpose(1, 2).reshape(b, length, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


def _train(model: LlamaForCausalLM, tok: Tokenizer, steps: int, seed: int, seq_len: int = 128, batch: int = 16) -> None:
    text = CORPUS.read_text()
    eos = tok.token_to_id("<|eos|>")
    ids = torch.tensor(tok.encode(text).ids + [eos])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    show = _progress(steps, "training the tiny model")
    model.train()
    for step in range(steps):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq_len + 1] for s in starts])
        loss = F.cross_entropy(dense_logits(model, x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        show(step + 1, loss.item())
    model.eval()


def _progress(total: int, what: str) -> Callable[[int, float], None]:
    """A bar on a terminal, a log line every 10% otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=what, unit="step")

        def show(n: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if n == total:
                bar.close()

        return show

    def log_line(n: int, loss: float) -> None:
        if n == total or n % max(total // 10, 1) == 0:
            log.info("%s: step %d/%d loss %.3f", what, n, total, loss)

    return log_line
