"""Qwen2, Qwen3, Mistral and Llama 3 (rope scaling, tied embeddings) against transformers' own
implementation of each family: small config-built models with every weight random, saved with
save_pretrained as sharded safetensors, loaded by our engine, logits compared at every position
through chunked prefill and decode steps (fp32, 1e-4). And the chat template as transformers
applies it."""
from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.config import EngineConfig, ModelConfig
from gateway.worker.engine import Engine
from gateway.worker.families import UnsupportedModel
from gateway.worker.request import Request, SamplingParams
from gateway.worker.tokenizer import ChatTemplateError, Tokenizer
from tests.worker.test_model_hf import prompt, step_and_check

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # biases on q/k/v (Qwen2.5-0.5B ties)
    "qwen3": ("Qwen3Config", {"head_dim": 24, "tie_word_embeddings": False}),  # q/k norm; head_dim != 64/4
    "mistral": ("MistralConfig", {"sliding_window": 128}),  # a window the context never exceeds
    "llama3": ("LlamaConfig", {  # Llama 3.x rope scaling, all three bands within head_dim 16
        "tie_word_embeddings": True, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention_bias": True}),
}
ENGINE = {"block_size": 4, "num_blocks": 96, "max_num_seqs": 8, "max_num_batched_tokens": 16, "max_model_len": 128,
              "num_threads": 1}


def _randomize(model: torch.nn.Module) -> None:
    """Every weight random (transformers zero-initialises biases, which would hide a missing one)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            p.copy_(1.0 + noise if "norm" in name else noise)


@cache
def _hf_model(family: str, folder: str, tiny: str) -> Any:
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    if family == "llama3":
        cfg.head_dim = 16
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomize(model)
    model.save_pretrained(folder, max_shard_size="60KB")  # sharded, with an index
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny) / name, Path(folder) / name)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_dir: Path
           ) -> tuple[str, Path, Any]:
    folder = tmp_path_factory.mktemp(request.param)
    model = _hf_model(request.param, str(folder), str(model_dir))
    return request.param, folder, model


def test_logits_equal_transformers_through_prefill_chunks_and_decodes(family) -> None:
    name, folder, hf = family
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint was meant to be sharded"

    @cache
    def hf_logits(ids: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float()

    engine = Engine(ModelConfig(name=name, path=str(folder)), EngineConfig(**ENGINE))
    assert engine.runner.config.model_type == name.split("-")[0].replace("llama3", "llama")  # type: ignore[attr-defined]
    prompts = [prompt(37, 1), prompt(9, 2), prompt(70, 3)]
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    checked: dict[str, int] = {}
    for _ in range(60):
        if not engine.has_work():
            break
        for rid, n in step_and_check(engine, lambda ids: hf_logits(tuple(ids))).items():
            checked[rid] = checked.get(rid, 0) + n
    assert not engine.has_work()
    # every prompt position and the decode steps after it were compared
    assert checked == {f"r{i}": len(p) + 5 for i, p in enumerate(prompts)}


def _config(folder: Path, **changes: Any) -> Path:
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SMALL, **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return folder


def test_an_unsupported_family_is_a_clear_error(tmp_path: Path) -> None:
    folder = _config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel, match=r"model_type='gpt2'.*serves llama .*mistral.*qwen2.*qwen3"):
        Engine(ModelConfig(path=str(folder)), EngineConfig(**ENGINE))


def test_a_family_is_found_by_architectures_too(tmp_path: Path) -> None:
    from gateway.worker.model import LlamaConfig

    folder = _config(tmp_path, model_type=None, architectures=["Qwen2ForCausalLM"])
    mc = LlamaConfig.from_folder(folder)
    assert mc.model_type == "qwen2" and mc.qkv_bias and not mc.attention_bias


@pytest.mark.parametrize("changes", [{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                     {"rope_scaling": {"type": "dynamic", "factor": 2.0}}])
def test_unknown_rope_scaling_is_refused(tmp_path: Path, changes: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModel, match="rope scaling"):
        Engine(ModelConfig(path=str(_config(tmp_path, **changes))), EngineConfig(**ENGINE))


def test_a_sliding_window_shorter_than_the_context_is_refused(tmp_path: Path) -> None:
    folder = _config(tmp_path, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
    with pytest.raises(UnsupportedModel, match=r"sliding window of 64 .*max_model_len <= 64 \(it is 128\)"):
        Engine(ModelConfig(path=str(folder)), EngineConfig(**ENGINE))
    # Qwen's window applies only with use_sliding_window
    from gateway.worker.model import LlamaConfig

    q = _config(tmp_path, model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=64,
                use_sliding_window=False)
    assert LlamaConfig.from_folder(q).sliding_window is None


CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.index0 == 0 %}{{ raise_exception('assistant first') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief. Ünïcode ok"}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_chat_template_as_transformers_applies_it(tmp_path: Path, model_dir: Path, template: str) -> None:
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                                  bos_token="<|bos|>", eos_token="<|eos|>")
    hf_tok.chat_template = template
    hf_tok.save_pretrained(tmp_path)  # wherever this transformers version puts the template
    ours = Tokenizer(tmp_path)
    for msgs in (MESSAGES, MESSAGES[1:2]):
        want = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if not isinstance(want, list):  # transformers 5 returns a BatchEncoding
            want = want["input_ids"]
        assert ours.apply_chat_template(msgs) == want


def test_a_template_refusal_is_a_chat_template_error(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "chat_template": LLAMA3}))
    with pytest.raises(ChatTemplateError, match="assistant first"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "assistant", "content": "x"}])
