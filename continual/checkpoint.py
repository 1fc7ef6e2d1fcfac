"""Per-task checkpoints: safetensors for tensors, a small JSON manifest for everything else.

Only safetensors files are ever read back (no pickle), so a checkpoint folder from elsewhere cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


def _file_for(task_index: int, task_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)
    return f"task{task_index:03d}-{safe}.safetensors"


def save_task_state(
    directory: str | Path, task_index: int, task_name: str, state: Dict[str, torch.Tensor], meta: Dict | None = None
) -> int:
    """Write one task's tensors and record them in the manifest. Returns the bytes written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights): store independent contiguous copies.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    filename = _file_for(task_index, task_name)
    save_file(tensors, str(directory / filename), metadata={"task": task_name, "index": str(task_index)})
    size = (directory / filename).stat().st_size
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"tasks": {}}
    manifest["tasks"][task_name] = {
        "index": task_index,
        "file": filename,
        "bytes": size,
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        **(meta or {}),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(manifest_path)  # never leave a half-written manifest behind
    return size


def load_task_state(directory: str | Path, task_name: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Read one task's tensors and its manifest entry."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no checkpoint manifest at {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}: not valid JSON ({err})") from err
    entry = manifest.get("tasks", {}).get(task_name)
    if entry is None:
        known = ", ".join(manifest.get("tasks", {})) or "(none)"
        raise KeyError(f"{manifest_path}: no checkpoint for task {task_name!r}; it has: {known}")
    return load_file(str(directory / entry["file"])), entry
