"""LoRA adapters on the learner's model (workers/learner/adapters.py) and the weights they export
(workers/learner/weights.py), without Ray: the merged weights are the adapted model's, the
disabled adapters are the base model, and the adapter folder loads in peft."""

import pytest
import torch

from orchestrator.config import LoraConfig, Recipe
from tests.conftest import recipe_dict


def _adapted(model_path, **lora):
    from transformers import AutoModelForCausalLM

    from workers.learner.adapters import LoraModel

    builder = LoraModel(LoraConfig(**({"rank": 4, "alpha": 8} | lora)))
    lm = builder.build(AutoModelForCausalLM.from_pretrained(model_path))
    torch.manual_seed(0)
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (the adapted model is the base): move it
            p.data.normal_(0, 0.5)
    return builder, lm.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_merged_weights_are_the_adapted_model_and_disabled_adapters_the_base(tiny_model,
                                                                             tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workers.learner.adapters import merge_state
    from workers.learner.weights import AdapterWeights, MergedWeights

    builder, lm = _adapted(tiny_model)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 4]])
    adapted = _logits(lm, ids)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base = _logits(base_model, ids)
    assert (adapted - base).abs().max() > 0.1  # the adapters moved the model
    with builder.reference():
        torch.testing.assert_close(_logits(lm, ids), base, rtol=0, atol=1e-6)

    named = dict(lm.named_parameters())
    merged = {e.name: e.value(named) for e in MergedWeights(named, builder).entries}
    assert set(merged) == {n for n, _ in base_model.named_parameters()}  # the model's names
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fresh.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(fresh, ids), adapted, rtol=0, atol=1e-5)

    # a checkpoint's state merges to the same weights; its adapters load in peft
    merged2, adapter = merge_state(lm.state_dict(), 8 / 4)
    for name, w in merged.items():
        torch.testing.assert_close(merged2[name], w, rtol=0, atol=0)
    assert set(adapter) == {e.name for e in AdapterWeights(named, builder).entries}
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in adapter)
    builder.save_adapter(adapter, str(tmp_path / "adapter"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                     str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft, ids), adapted, rtol=0, atol=1e-5)


def test_only_adapters_train_and_linear_layers_only(tiny_model):
    builder, lm = _adapted(tiny_model, target_modules=["q_proj", "v_proj"])
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trained)
    assert {id(p) for p in builder.trainable(lm)} == \
        {id(p) for p in lm.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no_such_proj.*not found"):
        _adapted(tiny_model, target_modules=["no_such_proj"])


def _recipe(tmp_path, **over):
    return Recipe.model_validate(recipe_dict(tmp_path / "m", tmp_path / "run", **over))


def test_recipe_checks_for_adapters(tmp_path):
    from pydantic import ValidationError

    lora = {"rank": 8}
    # the learner with its adapters disabled is the reference: no role needed for the KL
    r = _recipe(tmp_path, **{"model.lora": lora, "algorithm.kl": 0.1})
    assert r.roles.reference is None and r.model.lora.rank == 8
    with pytest.raises(ValidationError, match="needs roles.reference"):
        _recipe(tmp_path, **{"algorithm.kl": 0.1})
    # an engine needs an adapter slot per weight version in flight
    with pytest.raises(ValidationError, match=r"max_loras=1 is fewer .*max_staleness \+ 1 = 2"):
        _recipe(tmp_path, **{"model.lora": lora, "rollout.max_staleness": 1,
                             "roles.rollout.args.max_loras": 1})
    _recipe(tmp_path, **{"model.lora": lora, "rollout.max_staleness": 1,
                         "roles.rollout.args.max_loras": 2})
    _recipe(tmp_path, **{"model.lora": lora | {"sync": "merged"}, "rollout.max_staleness": 1,
                         "roles.rollout.args.max_loras": 1})  # merged: no adapters there
    with pytest.raises(ValidationError, match="update_mode keep"):
        _recipe(tmp_path, **{"model.lora": lora, "roles.rollout.args.update_mode": "keep"})
    with pytest.raises(ValidationError, match="set model.lora.sync to merged"):
        _recipe(tmp_path, **{"model.lora": lora | {"modules_to_save": ["lm_head"]}})


def test_a_module_trained_in_full_goes_into_the_merged_weights_and_the_adapter_folder(
        tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workers.learner.weights import AdapterWeights, MergedWeights

    with pytest.raises(ValueError, match="tied to its input embeddings"):
        _adapted(tiny_model, modules_to_save=["lm_head"], sync="merged")
    builder, lm = _adapted(tiny_model, modules_to_save=["norm"], sync="merged")
    for name, p in lm.named_parameters():
        if ".modules_to_save." in name:  # the norms trained in full: move them too
            p.data.add_(0.1)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 4]])
    adapted = _logits(lm, ids)
    named = dict(lm.named_parameters())
    saved = {e.name: e.value(named) for e in AdapterWeights(named, builder).entries}
    assert "base_model.model.model.norm.weight" in saved
    builder.save_adapter(saved, str(tmp_path / "adapter"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                     str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft, ids), adapted, rtol=0, atol=1e-5)
    merged = {e.name: e.value(named) for e in MergedWeights(named, builder).entries}
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fresh.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(fresh, ids), adapted, rtol=0, atol=1e-5)
