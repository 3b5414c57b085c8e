"""Streaming LoRA merge: equal to PEFT's merge_and_unload, base dtype kept, every key accounted for."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trnft.common import cli
from trnft.common.io.hf_files import TOKENIZER_FILES
from trnft.common.testing.fixtures import TinyShape, build_tiny_model

pytestmark = pytest.mark.both_lines  # shared code whose libraries differ between the lines

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("bf16") / "base", "llama", dtype="bfloat16")


def make_adapter(base_dir, out, scale=0.5, **lora):
    """A trained-looking PEFT adapter (random non-zero B, scaled by ``scale``) saved with PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": ALL, "init_lora_weights": False, **lora}
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)
    return out


def peft_reference(base_dir, adapter_dir, dtype="auto"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def merge(base, adapter, out, *extra) -> int:
    return cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out), *extra])


def logits(model, seed=0):
    ids = torch.randint(5, 500, (4, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 4}},
        {"target_modules": ["embed_tokens", "q_proj", "v_proj"], "scale": 0.05},
    ],
    ids=["plain", "rslora", "rank-alpha-patterns", "embedding"],
)
def test_merged_logits_match_peft_merge_and_unload(tmp_path, bf16_base, lora):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bf16_base, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    assert merge(bf16_base, adapter, out) == 0
    ours = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    ref = peft_reference(bf16_base, adapter)
    assert ours.dtype == ref.dtype == torch.bfloat16
    exact_model = peft_reference(bf16_base, adapter, dtype=torch.float32)
    a, b, exact = logits(ours), logits(ref), logits(exact_model)
    # PEFT rounds W and delta to bf16 separately; we round W + delta once. Both carry bf16 noise
    # (amplified by the tiny model's large init), so ours must be at least as close to the fp32
    # merge as PEFT's own bf16 merge is, and predict the fp32 merge's token as often.
    ours_err, peft_err = (a - exact).abs().mean().item(), (b - exact).abs().mean().item()
    assert ours_err <= 1.25 * peft_err + 1e-3, (ours_err, peft_err)
    agree = lambda x: (x.argmax(-1) == exact.argmax(-1)).float().mean().item()  # noqa: E731
    assert agree(a) >= agree(b) - 0.02, (agree(a), agree(b))
    base_logits = logits(AutoModelForCausalLM.from_pretrained(bf16_base, dtype="auto"))
    assert (a - base_logits).abs().mean().item() > 5 * ours_err  # the adapter did something
    # Stronger: our bf16 weights are the fp32 merge rounded once (to within one bf16 ulp)
    merged, reference = ours.state_dict(), exact_model.state_dict()
    assert merged.keys() == reference.keys()
    for name, weight in merged.items():
        torch.testing.assert_close(
            weight.float(), reference[name].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6, msg=name
        )
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (out / name).is_file(), name


def test_fp32_merge_equals_peft_exactly(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    assert merge(tiny_llama, adapter, tmp_path / "merged") == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    ref = peft_reference(tiny_llama, adapter).state_dict()
    assert ours.keys() == ref.keys()
    assert max((ours[k] - ref[k]).abs().max().item() for k in ours) < 1e-6


def tiny_gpt2(folder):
    """A tiny GPT-2 (Conv1D weights stored [in, out], LayerNorms with bias) saved to ``folder``."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64)
    ).save_pretrained(folder)
    return folder


def test_fan_in_fan_out_conv1d_model(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]; PEFT's fan_in_fan_out transposes the delta."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(
        base_dir, tmp_path / "adapter", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    assert merge(base_dir, adapter, tmp_path / "merged") == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(ours), logits(peft_reference(base_dir, adapter)), atol=1e-5, rtol=1e-5)


def test_modules_to_save_replaces_weight_and_bias(tmp_path):
    """A trained copy of a module with weight and bias (GPT-2's final LayerNorm) replaces each one by its own."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(
        base_dir,
        tmp_path / "adapter",
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        modules_to_save=["ln_f"],
    )
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    saved = [k for k in tensors if ".ln_f." in k]  # PEFT saves the copy under the module's own name
    assert {k.rsplit(".", 1)[1] for k in saved} == {"weight", "bias"}
    generator = torch.Generator().manual_seed(5)
    for k in saved:  # a trained-looking copy: weight and bias differ from each other and from the base
        tensors[k] = tensors[k] + torch.randn(tensors[k].shape, generator=generator)
    save_file(tensors, path)  # test data only
    assert merge(base_dir, adapter, tmp_path / "merged") == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(ours), logits(peft_reference(base_dir, adapter)), atol=1e-5, rtol=1e-5)


def test_the_old_sample_layout_is_read_too(tmp_path, tiny_llama):
    """The awsome sample consolidated adapters into model.safetensors (+ index) without adapter names."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    old = tmp_path / "old-adapter"
    old.mkdir()
    shutil.copy(adapter / "adapter_config.json", old / "adapter_config.json")
    save_file(load_file(adapter / "adapter_model.safetensors"), old / "model.safetensors")
    assert merge(tiny_llama, old, tmp_path / "from-old") == 0
    assert merge(tiny_llama, adapter, tmp_path / "from-new") == 0
    a = load_file(tmp_path / "from-old" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "from-new" / "model-00001-of-00001.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keys_with_the_adapter_name_are_accepted(tmp_path, tiny_llama):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    named = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }  # test data only
    save_file(named, adapter / "adapter_model.safetensors")
    assert merge(tiny_llama, adapter, tmp_path / "merged") == 0


def _tamper(kind, adapter):
    path = adapter / "adapter_model.safetensors"
    sd = load_file(path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    first = "base_model.model.model.layers.0.self_attn.q_proj"
    if kind == "renamed":
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_a.weight"] = sd.pop(
            f"{first}.lora_A.weight"
        )
        message = "adapter key base_model.model.model.layers.0.self_attn.q_proj.lora_a.weight is not a LoRA tensor name"
    elif kind == "wrong-module":
        sd["base_model.model.model.layers.0.self_attn.qx_proj.lora_A.weight"] = sd[
            f"{first}.lora_A.weight"
        ].clone()
        sd["base_model.model.model.layers.0.self_attn.qx_proj.lora_B.weight"] = sd[
            f"{first}.lora_B.weight"
        ].clone()
        message = "the base model has no tensor model.layers.0.self_attn.qx_proj.weight"
    elif kind == "extra":
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.extra.weight.x"] = sd[
            f"{first}.lora_A.weight"
        ].clone()
        message = "is not a LoRA tensor name"
    elif kind == "orphan":
        del sd[f"{first}.lora_B.weight"]
        message = f"{first}.lora_A.weight: no matching B tensor for module model.layers.0.self_attn.q_proj"
    elif kind == "rank":
        config["r"] = 16
        message = "adapter_config says r=16"
    elif kind == "missing-target":
        sd = {k: v for k, v in sd.items() if ".v_proj." not in k}
        message = (
            "adapter_config.json targets v_proj but the adapter has no LoRA tensors for any v_proj module"
        )
    elif kind == "dora":
        config["use_dora"] = True
        message = "use_dora is set; DoRA adapters"
    elif kind == "ia3":
        config["peft_type"] = "IA3"
        message = "peft_type IA3 is not supported"
    elif kind == "zero":
        sd = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in sd.items()}
        message = "are identical to the base after merging"
    else:
        raise AssertionError(kind)
    save_file(sd, path)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return message


@pytest.mark.parametrize(
    "kind", ["renamed", "wrong-module", "extra", "orphan", "rank", "missing-target", "dora", "ia3", "zero"]
)
def test_bad_adapters_fail_naming_the_key_and_leave_nothing(tmp_path, tiny_llama, capsys, kind):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    message = _tamper(kind, adapter)
    out = tmp_path / "merged"
    code = merge(tiny_llama, adapter, out)
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".merged.staging-*"))


def test_base_sharded_in_several_files_and_output_shard_size(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = build_tiny_model(tmp_path / "base", shape=TinyShape(num_hidden_layers=3))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    for name in TOKENIZER_FILES:  # transformers 5 writes no special_tokens_map.json; 4.57 does
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, sharded / name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    adapter = make_adapter(sharded, tmp_path / "adapter")
    assert merge(sharded, adapter, tmp_path / "merged", "--max-shard-size", "400KB") == 0
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # Three layers of fp32 rounding ((W + s BA) x against W x + s B(A x)): 4e-5 seen on some machines.
    torch.testing.assert_close(logits(ours), logits(peft_reference(sharded, adapter)), atol=1e-4, rtol=1e-4)


def test_two_standalone_merges_to_one_output_one_refuses_the_other_completes(tmp_path, tiny_llama):
    """The first merge holds the output's lock (stalled 6 s once staged); a second one to the same
    --output is refused in one line and touches nothing; the first then finishes and its output equals a
    merge that ran alone. Before the lock the second deleted the first's live staging folder as 'left by an
    interrupted run' and the first died with FileNotFoundError."""
    import os
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    argv = [
        sys.executable,
        "-m",
        "trnft.common.cli",
        "merge",
        "--base",
        str(tiny_llama),
        "--adapter",
        str(adapter),
    ]
    env = {**os.environ, "TRNFT_FAULT": "stall-during-output:staged", "TRNFT_FAULT_STALL_S": "6"}
    first = subprocess.Popen(
        [*argv, "--output", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = tmp_path / ".merged.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run([*argv, "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    err = second.stderr.strip().splitlines()
    assert (
        len(err) == 1 and f"--output: {out} is being written by another trnft (pid {first.pid}" in err[0]
    ), err
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err[-2000:]
    alone = tmp_path / "alone"
    assert merge(tiny_llama, adapter, alone) == 0
    files = sorted(p.name for p in alone.glob("*.safetensors"))
    assert files and sorted(p.name for p in out.glob("*.safetensors")) == files
    for name in files:
        mine, theirs = load_file(out / name), load_file(alone / name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    )  # no lock, no staging left
