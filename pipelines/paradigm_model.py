"""The worker side of the frozen-model paradigms (``pipelines.paradigms`` has what they are and the
driver's side: slots, prompts, checks): the frozen body with its per-task heads or prompts, and
what a task trains. Imports torch; the driver and the scheduler never import this module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import ParadigmConfig, RunConfig
from pipelines.errors import DataError
from pipelines.paradigms import TaskSlot

PARADIGM_STEM = "paradigm"  # in a checkpoint directory: a frozen-model paradigm's heads or prompts (.json, .safetensors)


class SoftPrompt(nn.Module):
    """One task's prompt: its vectors, put before the inputs' embeddings."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(initial.detach().clone())

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.vectors.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        ones = attention_mask.new_ones((embeds.shape[0], prompt.shape[1]))
        return torch.cat([prompt, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)


class SoftPrompts(nn.Module):
    """One ``SoftPrompt`` module per task (a module each, so that ZeRO-3's parameter trace follows
    the switch from one task's prompt to the next as it follows any change of module order)."""

    def __init__(self, initial: list[torch.Tensor]):
        super().__init__()
        self.prompts = nn.ModuleList([SoftPrompt(x) for x in initial])

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prompts[slot](embeds, attention_mask)


class ClassifierHeads(nn.Module):
    """One linear classifier per task over the frozen encoder's features."""

    def __init__(self, width: int, sizes: list[int]):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(width, size) for size in sizes])

    def forward(self, features: torch.Tensor, slot: int) -> torch.Tensor:
        return self.heads[slot](features.to(self.heads[slot].weight.dtype))


@dataclass
class ParadigmOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class ParadigmModel(nn.Module):
    """A frozen pretrained seq2seq model (``body``) with per-task heads or prompts.

    Every call that needs parameters goes through a submodule's ``forward`` (the body's embedding,
    encoder or generate; ``SoftPrompts``; ``ClassifierHeads``), so ZeRO-3 gathers them as it does
    for any module. ``active`` is the slot the next training forward uses (set per task).
    """

    def __init__(self, body: nn.Module, paradigm: ParadigmConfig, slots: list[TaskSlot]):
        super().__init__()
        if not paradigm.has_task_parameters:
            raise ValueError(f"paradigm {paradigm.name} has no per-task parameters")
        if not slots:
            raise DataError(f"paradigm {paradigm.name}: the stream has no trained task to give parameters to")
        self.body, self.paradigm, self.slots = body, paradigm, list(slots)
        self.slot_of = {slot.name: k for k, slot in enumerate(self.slots)}
        self.active = 0
        body.requires_grad_(False)
        if paradigm.name == "prompt_tuning":
            _check_prompt_room(body, paradigm.prompt_length)
            embed = body.get_input_embeddings()
            with torch.no_grad():
                initial = [embed(torch.tensor(list(itertools.islice(itertools.cycle(slot.prompt_ids),
                                                                    paradigm.prompt_length)))).float()
                           for slot in self.slots]
            self.prompts = SoftPrompts(initial)
        else:
            encoder_config = body.get_encoder().config
            self.labels = [slot.labels for slot in self.slots]
            self.class_index = [{label: c for c, label in enumerate(slot.labels)} for slot in self.slots]
            depth = getattr(encoder_config, "num_hidden_layers", None) or getattr(encoder_config, "num_layers", None)
            if depth is not None and paradigm.feature_layers > depth:
                raise DataError(f"paradigm.feature_layers={paradigm.feature_layers}, but the encoder has {depth} "
                                "layers; lower it")
            self.heads = ClassifierHeads(_hidden_size(encoder_config), [len(s.labels) for s in self.slots])

    # ---------------------------------------------------------------- parameters
    def slot_parameters(self) -> list[list[nn.Parameter]]:
        """Each slot's own parameters, in slot order: one optimizer parameter group each."""
        if self.paradigm.name == "prompt_tuning":
            return [[prompt.vectors] for prompt in self.prompts.prompts]
        return [list(head.parameters()) for head in self.heads.heads]

    def train(self, mode: bool = True) -> ParadigmModel:
        super().train(mode)
        if self.paradigm.name == "feature_extraction":
            self.body.eval()  # a fixed feature map: no dropout in the frozen encoder
        return self

    # ---------------------------------------------------------------- forward
    def _prompted(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.body.get_input_embeddings()(input_ids)
        return self.prompts(embeds, attention_mask, slot)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over non-padding tokens of the mean of the encoder's top ``feature_layers`` hidden states."""
        with torch.no_grad():
            out = self.body.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          output_hidden_states=True, return_dict=True)
            layers = torch.stack(out.hidden_states[-self.paradigm.feature_layers:]).float().mean(0)
            mask = attention_mask.unsqueeze(-1).float()
            return (layers * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def classes(self, targets: list[str], slot: int) -> torch.Tensor:
        """Class indices of ``targets`` in the slot's label set (-100: not in it, ignored by the loss)."""
        index = self.class_index[slot]
        return torch.tensor([index.get(t, -100) for t in targets], dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                class_ids: torch.Tensor | None = None) -> ParadigmOutput:
        slot = self.active
        if self.paradigm.name == "prompt_tuning":
            embeds, mask = self._prompted(input_ids, attention_mask, slot)
            out = self.body(inputs_embeds=embeds, attention_mask=mask, labels=labels)
            return ParadigmOutput(out.loss, out.logits)
        logits = self.heads(self.features(input_ids, attention_mask), slot)
        loss = F.cross_entropy(logits.float(), class_ids) if class_ids is not None else None
        return ParadigmOutput(loss, logits)

    @torch.no_grad()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str,
                generate: dict[str, Any]) -> list[str] | torch.Tensor:
        """Task ``task``'s answers: label strings (feature extraction) or generated token ids."""
        slot = self.slot_of[task]
        if self.paradigm.name == "prompt_tuning":
            embeds, mask = self._prompted(input_ids, attention_mask, slot)
            return self.body.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
        logits = self.heads(self.features(input_ids, attention_mask), slot)
        return [self.labels[slot][c] for c in logits.argmax(-1).tolist()]

    def encoder_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
        """What the body's encoder reads for task ``task``: under prompt tuning, its prompt before the input."""
        if self.paradigm.name != "prompt_tuning":
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        embeds, mask = self._prompted(input_ids, attention_mask, self.slot_of[task])
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the body's weights: the paradigm, slots and their tensors."""
        own = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("body.")}
        return {"paradigm": self.paradigm.model_dump(), "slots": [vars(s) for s in self.slots], "state": own}


def _hidden_size(config: Any) -> int:
    for name in ("hidden_size", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise DataError(f"cannot tell the encoder's hidden size from its config ({type(config).__name__})")


def _encoder_positions(body: nn.Module) -> int | None:
    """How many positions the encoder has learned (BART, BERT: 512); None where they are relative (T5)."""
    return getattr(body.get_encoder().config, "max_position_embeddings", None)


def _check_prompt_room(body: nn.Module, prompt_length: int) -> None:
    """A soft prompt takes positions: refuse one that leaves none for the input (BERT: 512)."""
    limit = _encoder_positions(body)
    if limit is not None and prompt_length >= limit:
        raise DataError(f"paradigm.prompt_length={prompt_length} fills the encoder's {limit} positions; lower it")


def source_tokens(body: nn.Module, config: RunConfig) -> int:
    """The most tokens a source is given: ``stream.max_source_tokens``, and under prompt tuning, on
    an encoder with learned positions, no more than the positions its soft prompt leaves.

    A longer source is cut to this, as to ``stream.max_source_tokens`` under every paradigm (prompt
    tuning on BART or BERT at 512: 512 positions less a 20-vector prompt, 492 tokens).

    Raises:
        DataError: ``stream.max_source_tokens`` beyond the encoder's positions, under any paradigm
            (the first source that long would index past the position table).
    """
    tokens, limit = config.stream.max_source_tokens, _encoder_positions(body)
    if limit is None:
        return tokens
    if tokens > limit:
        raise DataError(f"stream.max_source_tokens={tokens} is more than the {limit} positions of the encoder "
                        f"(model.arch={config.model.arch}); set it to {limit} or less")
    if config.paradigm.name != "prompt_tuning" or tokens + config.paradigm.prompt_length <= limit:
        return tokens
    return limit - config.paradigm.prompt_length


def trained_for(model: nn.Module, config: RunConfig, task: str) -> tuple[int, int]:
    """(parameters, bytes) trained for ``task``: every weight (fine tuning), its head or prompt, or
    none (prompt engineering). The bytes are what serving the task alongside the others costs in
    weights: a model copy per task for fine tuning, one head or prompt for the frozen paradigms."""
    if isinstance(model, ParadigmModel):
        params = model.slot_parameters()[model.slot_of[task]]
    elif config.paradigm.name == "prompt_engineering":
        params = []
    else:
        params = list(model.parameters())
    numel = [getattr(p, "ds_numel", None) or p.numel() for p in params]  # ds_numel: partitioned under ZeRO-3
    return sum(numel), sum(n * p.element_size() for n, p in zip(numel, params))
