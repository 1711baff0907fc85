"""Pushing a RestoreLCC adapter to the Hugging Face Hub with a model card that says what it is.

``PeftModel.push_to_hub`` works for RestoreLCC adapters as for any PEFT method, but transformers' push replaces the
card PEFT wrote with a generic one. ``push_to_hub`` here uploads the same files with a card that names the method,
the base model and the compensated heads.
"""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import hub as transformers_hub

from ..tuner.config import RestoreLCCConfig


def model_card(model, adapter_name: str = "default") -> ModelCard:
    """A model card for a RestoreLCC ``PeftModel``: method, base model, heads and trainable parameters."""
    config: RestoreLCCConfig = model.peft_config[adapter_name]
    base_model = config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", "") or None
    heads = config.heads or {}
    num_heads = sum(len(layer_heads) for layer_heads in heads.values()) if heads else "all"
    trainable, _ = model.get_nb_trainable_parameters()
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=sorted({"restorelcc", "peft", "pruning", "transformers"}),
        pipeline_tag="text-generation",
    )
    text = (
        f"---\n{card_data.to_yaml()}\n---\n\n"
        f"# RestoreLCC adapter for {base_model or 'a pruned model'}\n\n"
        "A [RestoreLCC](https://arxiv.org/abs/2510.21834) adapter made with `peft_restorelcc`: selected attention "
        "heads of a pruned model get the components that pruning removed from their outputs put back, as a learned "
        "vector per head added to the input of the attention output projection. Merging folds it into that "
        "projection's bias, so the pruned weights and their sparsity stay exactly as they are.\n\n"
        f"- base model: `{base_model}`\n"
        f"- compensated heads: {num_heads} (layers {sorted(heads) if heads else 'all'})\n"
        f"- components per head: {config.num_components}, head_dim: {config.head_dim}\n"
        f"- trainable parameters: {trainable:,}\n\n"
        "## Use\n\n"
        "```python\nimport peft_restorelcc  # registers RestoreLCC with PEFT; import before loading\n"
        "from peft import PeftModel\n"
        f'model = PeftModel.from_pretrained(pruned_model, "<this repo>", adapter_name="{adapter_name}")\n```\n'
    )
    return ModelCard(text)


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload RestoreLCC adapter",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload what ``model.save_pretrained`` writes (adapter config + safetensors) with a RestoreLCC model card."""
    repo_id = transformers_hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        model_card(model).save(os.path.join(staging, "README.md"))
        return model._upload_modified_files(
            staging,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )
