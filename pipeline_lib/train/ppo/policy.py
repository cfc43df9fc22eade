"""The policy with a scalar value head, and freezing all but the top transformer blocks."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "norm_f", "ln_final")


def _hidden_size(policy) -> int:
    config = policy.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


class PolicyWithValueHead(nn.Module):
    """A causal LM with a scalar value head on its last hidden state.

    ``forward`` returns ``(logits, values)`` of shapes (B, L, V) and (B, L) (float32 values).
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.policy = policy
        if value_head is None:
            value_head = nn.Linear(_hidden_size(policy), 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values.float()


def _transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the ``nn.ModuleList`` of num_hidden_layers."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and (n_layers is None or len(m) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"could not find the transformer blocks of {type(model).__name__}")
    candidates.sort(key=lambda item: (item[0].count("."), -len(item[1])))
    return candidates[0][1]


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _lm_head_is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


def set_trainable_top_layers(model: nn.Module, k: int | None) -> list[str]:
    """Freeze all but the top ``k`` transformer blocks, the final norm and an untied LM head.

    ``k = None`` makes every parameter trainable. Returns the names of trainable parameters.
    """
    if k is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    blocks = _transformer_blocks(model)
    if k > len(blocks):
        raise ValueError(f"trainable_top_layers={k} but the model has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    train_modules: list[nn.Module] = list(blocks[len(blocks) - k :]) if k > 0 else []
    norm = _final_norm(model)
    if norm is None:
        log.warning("no final norm found on %s; only the top blocks are trained",
                    type(model).__name__)
    else:
        train_modules.append(norm)
    if not _lm_head_is_tied(model) and model.get_output_embeddings() is not None:
        train_modules.append(model.get_output_embeddings())
    for module in train_modules:
        for p in module.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
