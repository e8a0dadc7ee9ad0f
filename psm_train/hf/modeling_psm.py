"""Hugging Face transformers classes for a psm-train export directory (shipped in it as modeling_psm.py).

``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads this file from the
export: `PSMConfig` reads config.json, `PSMForCausalLM` wraps the psm-train model (``.model``) and
loads model.safetensors with psm-train's own loader, so its logits are psm-train's. ``generate``
carries the model's online state (binary counter, recurrent state or KV cache) between steps in
`OnlineCache` and feeds it only the new tokens. Requires psm-train to be installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from psm_train.pretrained.export_dir import CONFIG_FILE, WEIGHTS_FILE, build_exported_model, load_weights


class PSMConfig(PretrainedConfig):
    """config.json of an export: ``psm_model``, ``psm_model_config`` and ``vocab_size`` build the model."""

    model_type = "psm_train"

    def __init__(self, psm_model: str = "transformer_psm", psm_model_config: dict | None = None,
                 vocab_size: int = 0, **kwargs):
        self.psm_model = psm_model
        self.psm_model_config = dict(psm_model_config or {})
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class OnlineCache:
    """The psm-train generation state of a batch, and how many tokens of each sequence it has consumed."""

    def __init__(self, state, seen: int = 0):
        self.state, self.seen = state, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def nbytes(self) -> int:
        return self.state.nbytes()


class PSMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PSMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: PSMConfig):
        super().__init__(config)
        self.model = build_exported_model(config.to_dict(), f"{type(config).__name__}")
        self.post_init()

    def _init_weights(self, module):
        """The psm-train model initialises itself; weights then come from model.safetensors."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own online state (OnlineCache)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: PSMConfig | None = None, **kwargs):
        """Build the model eagerly and load the weights with psm-train's loader (a local directory).

        transformers' own loader would build the model on the meta device, leaving the buffers psm-train
        models compute at construction (RetNet's decays, rotary tables) unset.
        """
        directory = Path(pretrained_model_name_or_path)
        if not (directory / CONFIG_FILE).is_file():
            raise OSError(f"{directory}: expected a local psm-train export directory with {CONFIG_FILE}")
        if config is None:
            config = PSMConfig.from_pretrained(directory)
        model = cls(config)
        load_weights(model.model, directory / WEIGHTS_FILE)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        device = kwargs.get("device_map")
        if isinstance(device, (str, torch.device)) and str(device) != "auto":
            model.to(device)
        return model.eval()

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: OnlineCache | None = None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab_size] (fp32). Without ``cache``: the parallel forward over ``input_ids``, and,
        with ``use_cache``, a new OnlineCache that has consumed them. With ``cache``: ``input_ids`` are the
        tokens after those it has consumed, fed one at a time to the online state."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding is not supported: psm-train models take unpadded "
                             "sequences (generate one prompt at a time, or prompts of equal length)")
        if cache is None:
            logits = self.model(input_ids).float()
            if use_cache:
                cache = OnlineCache(self.model.init_generation(input_ids.shape[0]))
                self._consume(cache, input_ids)
        else:
            logits = self._consume(cache, input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache or cache is not None else None)

    @staticmethod
    def _consume(cache: OnlineCache, input_ids: torch.Tensor) -> torch.Tensor:
        steps = [cache.state.step(input_ids[:, t]).float() for t in range(input_ids.shape[1])]
        cache.seen += input_ids.shape[1]
        return torch.stack(steps, dim=1)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: OnlineCache | None = None,
                                      attention_mask: torch.Tensor | None = None, **kwargs) -> dict:
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": True, "attention_mask": attention_mask}
