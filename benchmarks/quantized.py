"""QLoRA on a Llama-structured model at CPU width: visionpeft's LoRA on a 4-bit NF4 base against bf16 LoRA and PEFT's
QLoRA (peft's LoRA on the same bitsandbytes model).

The model is a transformers ``LlamaForCausalLM`` from a config (random init, seed 0): 16 decoder layers of width 1024
(MLP 2816, 16 heads), a vocabulary of 8192, about 220M parameters; a batch of 2 sequences of 128 tokens, causal-LM
loss. Every configuration trains LoRA at rank 16 (alpha 16) on the attention and MLP projections of every decoder
layer (visionpeft's ``targets=None`` preset; PEFT gets the same module names). The NF4 configurations replace those
projections with bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16 compute) holding the same weights, as
``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` does; embeddings, norms and the head
stay bf16. Configurations (each in its own process, ``harness.py``):

- ``frozen``: the NF4 model, only the first decoder layer's input norm trains (gradients through every block): the floor;
- ``qlora``: visionpeft LoRA on the NF4 model;
- ``peft-qlora``: PEFT LoRA on the NF4 model (the peer);
- ``bf16-lora``: visionpeft LoRA on the bf16 model.

    python benchmarks/quantized.py --repeats 2 --steps 4          # the measurement (quiet machine)
    python benchmarks/quantized.py --size tiny --repeats 1 --steps 1 --warmup 0   # smoke: seconds
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402

RANK = 16
SIZES = {
    "cpu": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, batch=2, tokens=128),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, batch=2, tokens=16),
}


def build(size: str):
    def make():
        from transformers import LlamaConfig, LlamaForCausalLM

        spec = {k: v for k, v in SIZES[size].items() if k not in ("batch", "tokens")}
        config = LlamaConfig(**spec, max_position_embeddings=SIZES[size]["tokens"])
        return LlamaForCausalLM(config).to(torch.bfloat16)

    return make


def batch(size: str):
    def make(device):
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SIZES[size]["vocab_size"], (SIZES[size]["batch"], SIZES[size]["tokens"]), generator=generator)
        return ids.to(device), ids.to(device)

    return make


def lm_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def projections(model) -> list[str]:
    """The modules visionpeft's preset adapts: every projection of the decoder layers."""
    from visionpeft.targeting import resolve_targets

    return [t.name for t in resolve_targets(model, None)]


def to_nf4(model):
    """Replace the decoder projections by bitsandbytes NF4 ``Linear4bit`` layers holding the same weights."""
    import bitsandbytes as bnb

    for name in projections(model):
        parent, leaf = name.rsplit(".", 1)
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=torch.bfloat16,
                                compress_statistics=True, quant_type="nf4")
        new.load_state_dict(old.state_dict())
        setattr(model.get_submodule(parent), leaf, new.to(old.weight.device))  # quantized on .to(device)
    return model


def first_norm(model):
    return [model.model.layers[0].input_layernorm.weight]


def frozen(model, workload):
    return frozen_floor(to_nf4(model), workload)


def qlora(model, workload):
    import visionpeft as vp

    return vp.attach(to_nf4(model), "lora", rank=RANK, alpha=RANK)


def peft_qlora(model, workload):
    from peft import LoraConfig, get_peft_model

    names = projections(model)
    return get_peft_model(to_nf4(model), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names))


def bf16_lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", rank=RANK, alpha=RANK)


CONFIGS = {"frozen": frozen, "qlora": qlora, "peft-qlora": peft_qlora, "bf16-lora": bf16_lora}


def workload(size: str) -> Workload:
    spec = SIZES[size]
    title = (f"QLoRA r={RANK}: Llama-structured LM ({spec['num_hidden_layers']} layers, width {spec['hidden_size']}, "
             f"vocabulary {spec['vocab_size']}), batch {spec['batch']} × {spec['tokens']} tokens, NF4 base vs bf16")
    return Workload(title, build(size), batch(size), lm_loss, floor_params=first_norm)


WORKLOADS = {f"llama-{size}": workload(size) for size in SIZES}


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--size" in argv:  # --size cpu|tiny picks the workload
        at = argv.index("--size")
        argv[at:at + 2] = ["--workloads", f"llama-{argv[at + 1]}"]
    elif "--workloads" not in argv and "--child" not in argv:
        argv += ["--workloads", "llama-cpu"]
    main(CONFIGS, WORKLOADS, floor="frozen", peer="peft-qlora", argv=argv)
