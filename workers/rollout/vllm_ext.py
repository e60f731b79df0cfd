"""Methods added to vLLM's worker (``LLM(worker_extension_cls=...)``) for weight sync.

They run inside the vLLM worker process — the one that holds the model — and are called with
``llm.collective_rpc("braid_...")``. Weights arrive over braid's own sync group (not pickled
through the RPC) and stream bucket by bucket into ``model_runner.reload_weights``: beyond the
model itself, an engine holds two bucket-sized buffers and the copies of the tensors of the
layers being loaded (vLLM's layer-by-layer reload keeps a layer's tensors until it is complete).

With LoRA adapters (``model.lora.sync: adapter``) the stream is the adapter's tensors alone: they
become a ``LoRAModel`` registered in the engine's LoRA manager under the weight version as its
id, loaded from memory (vLLM would otherwise read a folder); a request asks for the version's
adapter by that id (``VLLMRollout.lora_request``) and finds it loaded.
"""

from __future__ import annotations


def _shared_parameters(model):
    """(module, name, owner module, owner name) for every parameter that aliases an earlier one
    (tied input/output embeddings). vLLM's in-place reload swaps the owner's tensor and puts the
    alias's old tensor back, which silently unties them; we re-tie after each reload and let the
    alias redo its post-load processing (on CPU that re-packs the GEMM weight it computes with)."""
    seen, aliases = {}, []
    for _, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                aliases.append((mod, p_name) + seen[id(p)])
            else:
                seen[id(p)] = (mod, p_name)
    return aliases


class BraidWeightSyncExtension:
    def braid_init_sync(self, host: str, port: int, world_size: int, rank: int,
                        manifest: dict, backend: str, timeout_s: float = 300.0) -> None:
        import logging

        from core.weight_sync import Manifest, SyncGroup, WeightReceiver

        # Each reload warns that rotary caches and a tied head "failed to load"; they hold no
        # checkpoint weights, and the tie is restored below.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(
            logging.ERROR)

        # `rank` is the first rank of this engine; tensor-parallel workers follow it.
        group = SyncGroup(host, port, world_size, rank + getattr(self, "rank", 0), backend,
                          timeout_s)
        self._braid_receiver = WeightReceiver(Manifest.from_dict(manifest), group)
        self._braid_engine = manifest.get("engine") or {"kind": "full"}
        self._braid_aliases = _shared_parameters(self.model_runner.get_model())
        self._braid_version = 0

    def braid_receive_weights(self, version: int) -> int:
        recv = self._braid_receiver
        self._braid_version = recv.begin(expected_version=version)
        if self._braid_engine["kind"] == "adapter":
            tensors = dict(recv.tensors())  # the stream is the sync: taken whole either way
            if version > 0:  # version 0 is the base model (peft starts B at 0): no adapter
                self._braid_add_adapter(version, tensors)
            return self._braid_version
        self.model_runner.reload_weights(weights_iterator=recv.tensors())
        if not recv.done:
            raise RuntimeError("vLLM's weight loader stopped before the last synced tensor")
        for mod, name, owner, owner_name in self._braid_aliases:
            setattr(mod, name, getattr(owner, owner_name))
            quant_method = getattr(mod, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(mod)
        return self._braid_version

    def _braid_add_adapter(self, version: int, tensors: dict) -> None:
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        manager = getattr(self.model_runner, "lora_manager", None)
        if manager is None:
            raise RuntimeError("the engine was started without LoRA (enable_lora) but receives "
                               "adapters")
        helper = PEFTHelper.from_dict(dict(self._braid_engine["peft_config"]))
        helper.validate_legal(manager.lora_config)
        adapters = manager._adapter_manager
        mapper = getattr(adapters.model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            version, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(adapters.model, "lora_skip_prefixes", None))
        if version in adapters.list_adapters():  # the same version sent again (a resend)
            adapters.remove_adapter(version)
        # the oldest versions go, not the least recently used: a newer version's requests may
        # still wait in the queue, untouched, while an older one ran last
        capacity = manager.lora_config.max_cpu_loras or manager.lora_config.max_loras
        while len(adapters.list_adapters()) >= capacity:
            adapters.remove_adapter(min(adapters.list_adapters()))
        adapters.add_adapter(lora)

    def braid_weight_version(self) -> int:
        return getattr(self, "_braid_version", 0)
