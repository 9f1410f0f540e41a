"""Writes the Hugging Face side of an export: the transformers code files and the README.md model card."""
import os
import shutil
import string
from typing import Any, Mapping

from ovenc_jax.interop import torch_layout as layout_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE_FILE = "model_card.md"
CODE_FILES = (layout_lib.HF_CONFIG_MODULE + ".py", layout_lib.HF_MODEL_MODULE + ".py")

_ROPE_NOTES = {
    "official": "rotary channels paired (2i, 2i+1), as in the published OneVision-Encoder",
    "consistent": "rotary channel i paired with i + head_dim/2; the published OneVision-Encoder code "
                  "pairs them the other way, so load this model only with the code shipped here",
}


def _get(cfg: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
  node: Any = cfg
  for key in dotted.split("."):
    if not isinstance(node, Mapping) or key not in node:
      return default
    node = node[key]
  return default if node is None else node


def _name(path: str) -> str:
  # Folder names only: a card is meant for sharing, and local paths say nothing to its readers.
  return os.path.basename(str(path).rstrip("/")) or str(path)


def _sources(train_cfg: Mapping[str, Any] | None) -> str:
  sources = _get(train_cfg, "input.sources", [])
  if not sources:
    return "not recorded"
  total = sum(float(s.get("weight", 1.0)) for s in sources) or 1.0
  return ", ".join(f"`{_name(s['path'])}` ({float(s.get('weight', 1.0)) / total:.0%})" for s in sources)


def card_fields(hf_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any] | None, step: int | None,
                num_params: int, repo: str | None = None) -> dict[str, str]:
  """The values the model card shows, as strings: from the export's config.json, the workdir's config.json
  (None when absent) and the checkpoint step."""
  width, heads = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
  label_table = _get(train_cfg, "input.label_table")
  fields = {
      "variant": str(_get(hf_cfg, "ovenc_jax.variant", "custom")),
      "width": width, "depth": hf_cfg["num_hidden_layers"], "num_heads": heads, "head_dim": width // heads,
      "mlp_dim": hf_cfg["intermediate_size"], "patch_size": hf_cfg["patch_size"],
      "patch_values": hf_cfg["patch_size"] ** 2 * 3, "num_params": f"{num_params:,}",
      "rope_layout": hf_cfg["rope_layout"], "rope_note": _ROPE_NOTES[hf_cfg["rope_layout"]],
      "rope_theta": f"{float(hf_cfg['rope_theta']):g}", "rope_temporal_size": hf_cfg["rope_temporal_size"],
      "tokens_per_row": _get(train_cfg, "input.tokens_per_row", "not recorded"),
      "max_segments": _get(train_cfg, "input.max_segments", "not recorded"),
      "temporal_positions": _get(train_cfg, "input.temporal_positions", "not recorded"),
      "sources": _sources(train_cfg),
      "label_table": f"`{_name(label_table)}`" if label_table else "none (labels stored in the records)",
      "num_classes": _get(train_cfg, "loss.num_classes", "not recorded"),
      "total_steps": _get(train_cfg, "total_steps", "not recorded"),
      "step": "unknown" if step is None else step,
      "global_batch_size": _get(train_cfg, "input.global_batch_size", "not recorded"),
      "training_note": ("" if train_cfg is not None else
                        "The training workdir had no config.json: the training data and steps were not recorded."),
      "repo": repo or "PATH/TO/THIS/FOLDER",
      "config_module": layout_lib.HF_CONFIG_MODULE, "model_module": layout_lib.HF_MODEL_MODULE,
  }
  return {k: str(v) for k, v in fields.items()}


def render_card(fields: Mapping[str, str]) -> str:
  with open(os.path.join(_HERE, TEMPLATE_FILE)) as f:
    return string.Template(f.read()).substitute(fields)


def write_hf_files(directory: str, fields: Mapping[str, str]) -> list[str]:
  """Copies the transformers code files into DIRECTORY and writes README.md; returns the file names."""
  for name in CODE_FILES:
    shutil.copyfile(os.path.join(_HERE, name), os.path.join(directory, name))
  with open(os.path.join(directory, layout_lib.CARD_FILE), "w") as f:
    f.write(render_card(fields))
  return [*CODE_FILES, layout_lib.CARD_FILE]
