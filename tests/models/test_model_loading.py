"""Registry, weight-name mapping errors, HF directory and dummy loading."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from kestrel.loader import (
    find_safetensors_files,
    iter_safetensors_weights,
    load_model,
    read_generation_config,
    read_model_config,
    resolve_dtype,
)
from kestrel.models import LlamaForCausalLM, get_model_class, supported_architectures
from kestrel.testing.tiny_models import make_tiny_model
from tests.models.paged_batch import PagedRunner

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(
        tmp_path_factory.mktemp("sharded"), "qwen2", max_shard_size="60KB", with_tokenizer=False
    )


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_registry_maps_all_families_and_lists_supported_on_error() -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert get_model_class(arch).__name__ == arch  # one class per architecture
    assert supported_architectures() == sorted(
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    )
    with pytest.raises(ValueError) as info:
        get_model_class("GPT2LMHeadModel")
    message = str(info.value)
    assert "'GPT2LMHeadModel'" in message
    for arch in supported_architectures():
        assert arch in message


def test_load_weights_reports_missing_and_unexpected_names(sharded_dir: Path) -> None:
    config = read_model_config(sharded_dir)
    model = LlamaForCausalLM(config)
    dropped = {"model.layers.1.self_attn.k_proj.bias", "model.norm.weight"}
    weights = [
        (name, tensor)
        for name, tensor in iter_safetensors_weights(find_safetensors_files(sharded_dir))
        if name not in dropped
    ]
    weights.append(("model.layers.0.mlp.extra_proj.weight", torch.zeros(3)))
    with pytest.raises(ValueError) as info:
        model.load_weights(weights)
    message = str(info.value)
    assert "unexpected tensors ['model.layers.0.mlp.extra_proj.weight']" in message
    missing = message.split("parameters never loaded ")[1]
    # exactly those two, named as in the checkpoint
    assert sorted(ast.literal_eval(missing)) == sorted(dropped)


def test_load_weights_rejects_wrong_shape_and_ignores_inv_freq(sharded_dir: Path) -> None:
    config = read_model_config(sharded_dir)
    model = LlamaForCausalLM(config)
    weights = dict(iter_safetensors_weights(find_safetensors_files(sharded_dir)))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    loaded = model.load_weights(weights.items())
    assert "model.layers.0.self_attn.qkv_proj.weight" in loaded
    qkv = model.model.layers[0].self_attn.qkv_proj
    q_rows = config.q_size
    assert torch.equal(qkv.weight[:q_rows], weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(qkv.bias[-config.kv_size :], weights["model.layers.0.self_attn.v_proj.bias"])
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(5, 5\)"):
        model.load_weights(weights.items())


def test_tied_embeddings_share_one_parameter(tmp_path: Path) -> None:
    path = make_tiny_model(
        tmp_path / "tied", "llama", tie_word_embeddings=True, with_tokenizer=False
    )
    model, config = load_model(path)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_sharded_load_matches_checkpoint_and_generation_config(sharded_dir: Path) -> None:
    files = find_safetensors_files(sharded_dir)
    assert len(files) > 1 and all(f.name.startswith("model-0") for f in files)
    model, config = load_model(sharded_dir, dtype="bfloat16")
    assert config.architecture == "Qwen2ForCausalLM"
    weights = dict(iter_safetensors_weights(files))
    norm = model.model.layers[1].post_attention_layernorm.weight
    assert norm.dtype == torch.bfloat16
    expected = weights["model.layers.1.post_attention_layernorm.weight"].to(torch.bfloat16)
    assert torch.equal(norm, expected)
    generation = read_generation_config(sharded_dir)
    assert generation["eos_token_id"] == [2, 0] and generation["bos_token_id"] == 0


def test_tiny_model_uses_the_tokenizer_special_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = make_tiny_model(tmp_path / "tok", "qwen3", num_layers=1)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 512
    im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = read_model_config(path)
    assert config.eos_token_ids == (im_end,) and config.bos_token_id == endoftext
    assert read_generation_config(path)["eos_token_id"] == [im_end, endoftext]


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_malformed_config_names_the_file(tmp_path: Path, sharded_dir: Path) -> None:
    broken = copy_dir(sharded_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{broken / 'config.json'} is not valid JSON"):
        load_model(broken)
    raw = json.loads((sharded_dir / "config.json").read_text())
    del raw["hidden_size"]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config\.json.*'hidden_size'"):
        load_model(broken)


def test_missing_shard_names_the_shard(tmp_path: Path, sharded_dir: Path) -> None:
    broken = copy_dir(sharded_dir, tmp_path / "broken")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(broken)


def test_generation_config_absent_or_malformed(tmp_path: Path) -> None:
    assert read_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="generation_config.json"):
        read_generation_config(tmp_path)


def test_no_weights_needs_dummy(tmp_path: Path, sharded_dir: Path) -> None:
    shutil.copy(sharded_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="load_format='dummy'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="load_format='pt'"):
        load_model(tmp_path, load_format="pt")


def test_dummy_load_shapes_determinism_and_finite_logits(tmp_path: Path, sharded_dir: Path) -> None:
    shutil.copy(sharded_dir / "config.json", tmp_path / "config.json")
    model, config = load_model(tmp_path, load_format="dummy", seed=7)
    heads, kv_heads, head_dim = 4, 2, 16
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((heads + 2 * kv_heads) * head_dim, 64)
    assert attn.qkv_proj.bias.shape == ((heads + 2 * kv_heads) * head_dim,)
    assert attn.o_proj.bias is None  # Qwen2: no o_proj bias
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 128, 64)
    assert model.lm_head.weight.shape == (512, 64)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    std = model.model.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025

    again, _ = load_model(tmp_path, load_format="dummy", seed=7)
    other, _ = load_model(tmp_path, load_format="dummy", seed=8)
    for (name, a), (_, b), (_, c) in zip(
        model.named_parameters(), again.named_parameters(), other.named_parameters()
    ):
        assert torch.equal(a, b), name
        if name.endswith("proj.weight"):
            assert not torch.equal(a, c), name

    runner = PagedRunner(model, config, [[1, 2, 3, 4, 5], [9, 8, 7]], block_size=4)
    logits = runner.step([(0, 5), (1, 3)])
    assert logits[0].shape == (5, 512) and logits[1].shape == (3, 512)
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[1]).all()


def test_resolve_dtype() -> None:
    config = read_model_config_dict({"torch_dtype": "bfloat16"})
    assert resolve_dtype("auto", config, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, config, torch.device("cpu")) == torch.float16
    fp32 = read_model_config_dict({"torch_dtype": "float32"})
    assert resolve_dtype(None, fp32, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", fp32, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int4'"):
        resolve_dtype("int4", config, torch.device("cpu"))


def read_model_config_dict(overrides: dict):
    from kestrel.model_config import ModelConfig

    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
    }
    return ModelConfig.from_hf_config({**base, **overrides})
