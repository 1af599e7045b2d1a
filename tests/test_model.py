"""The LLaMA decoder: equality with Hugging Face transformers, shipped model configs, init, checkpointing."""
from pathlib import Path

import pytest
import torch
import yaml

from sltrain_cli.configs import MethodConfig, ModelConfig
from sltrain_cli.core.convert import apply_method
from sltrain_cli.core.model import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PAPER_DIMS = {  # hidden, intermediate, layers, heads: GaLore's reference LLaMA configs, as SLTrain uses them
    # (SLTrain, Han et al., NeurIPS 2024, arXiv:2406.02214; 60M-1B in its Table 2, 7B in Table 4)
    "llama_9m": (128, 352, 4, 4), "llama_20m": (256, 688, 4, 4), "llama_35m": (384, 1024, 6, 8),
    "llama_60m": (512, 1376, 8, 8), "llama_130m": (768, 2048, 12, 12), "llama_350m": (1024, 2736, 24, 16),
    "llama_1b": (2048, 5461, 24, 32), "llama_3b": (2560, 6848, 32, 32), "llama_7b": (4096, 11008, 32, 32),
    "tiny": (64, 176, 2, 4),
}


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"hidden_size": 64, "intermediate_size": 176, "num_layers": 2, "num_heads": 4,
                          "vocab_size": 101, "max_seq_len": 32, **kw})


@pytest.mark.parametrize("name", sorted(PAPER_DIMS))
def test_shipped_model_configs(name):
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg = ModelConfig(**data)
    assert cfg.name == name
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == PAPER_DIMS[name]
    assert cfg.vocab_size == 32000 and cfg.max_seq_len == 256 and cfg.rms_norm_eps == 1e-6


def test_every_model_yaml_is_known():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(PAPER_DIMS)


def test_matches_huggingface_llama():
    import transformers  # a required test dependency: the reference nobody here wrote
    cfg = small_cfg(rope_theta=500.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a mix-up of the two norms would show
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj"}
    state = {}
    for key, value in ours.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            state[f"model.layers.{i}.{names[mod]}.{leaf}"] = value
        else:
            mod, leaf = key.rsplit(".", 1)
            state[f"{names[mod]}.{leaf}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, -5:] = -100
    with torch.no_grad():
        a = ours(ids, labels=labels)
        b = hf(input_ids=ids, labels=labels)
    assert float((a.logits - b.logits).abs().max()) < 1e-4
    assert abs(float(a.loss) - float(b.loss)) < 1e-5


def test_init_weights_one_path():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    w = model.layers[0].mlp.up.weight
    assert abs(float(w.detach().std()) - cfg.init_std) < 0.003
    assert abs(float(model.embed_tokens.weight.detach().std()) - 0.02) < 0.003
    assert torch.all(model.layers[1].attn_norm.weight == 1) and torch.all(model.norm.weight == 1)

    apply_method(model, MethodConfig(name="sltrain", rank=4, delta=0.1, alpha=8))
    layer = model.layers[0].mlp.up
    support = layer.indices.clone()
    with torch.no_grad():
        layer.B.fill_(1.0)
    model.init_weights()  # swapped layers re-initialize themselves (B back to zero), same seeded support
    assert torch.all(layer.B == 0) and torch.equal(layer.indices, support)
    assert layer.values.abs().max() <= 1 / 64 ** 0.5

    # meta -> to_empty -> init_weights gives the same model as a direct build with the same seed
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    apply_method(meta, MethodConfig(name="sltrain", rank=4, delta=0.1, alpha=8))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.layers[0].mlp.up.indices, support)


def test_loss_ignores_masked_labels_and_checks_length():
    model = LlamaForCausalLM(small_cfg())
    ids = torch.randint(0, 101, (2, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 101), ids[:, 1:5].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    assert model(ids).loss is None
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = apply_method(LlamaForCausalLM(small_cfg()), MethodConfig(name="sltrain", rank=4, delta=0.1, alpha=8))
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.q.B.normal_(std=0.1)
    ids = torch.randint(0, 101, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing = True
    ckpt = grads()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = apply_method(LlamaForCausalLM(small_cfg()), MethodConfig(name="sltrain", rank=4, delta=0.1, alpha=8))
    ids = torch.randint(0, 101, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
