"""A run's resumable state: what a classification run needs to continue after its last finished task.

After every task the run writes one *generation* under ``RUN_DIR/state/``: the model tensors that differ from a
freshly built model (every task's modules and heads, and whatever training changed), the strategy's own state, the
router's statistics, the state of Avalanche plugins (EWC importances, the replay memory, LwF's teacher), the random
number generators, and the results so far (accuracy matrices, per-task records). Tensors are safetensors files (never
pickle), everything else JSON. A generation is written into a private folder, flushed and renamed, and only then
does ``state/manifest.json`` (itself written to a temporary file, flushed and renamed) point at it, with the SHA-256
of every file and a hash of the config; the generation before it is kept. A kill at any instant therefore leaves
either the previous state or the new one, and a truncated or altered file is found by its checksum.

Example::

    write_state(run_dir, finished=3, tensors={"model": {...}, "rng": {...}}, data={...}, config=flat_cfg)
    state = read_state(run_dir)          # the newest generation, checksums verified
    state.finished, state.tensors["model"], state.data["result"]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "state"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Fault injection for tests (``tests/test_resume.py``): ``CONTINUAL_KILL_AT=point:task`` makes the process SIGKILL
# itself at that point of that task (points: ``train``, ``eval``, ``write``). Nothing else reads it.
KILL_ENV = "CONTINUAL_KILL_AT"
# Config keys that may differ between a run and its resumption: they change neither what is trained nor its results
# on the same hardware.
RESUMABLE_CHANGES = ("training.progress", "training.device", "training.eval_batch_size", "tracking.uri",
                     "tracking.enabled")


class RunStateError(Exception):
    """A run folder's state cannot be used (missing, corrupt, from another config or backbone); the message names
    the file or the keys, and says what was kept."""


def kill_point(point: str, task: int) -> None:
    """SIGKILL this process when ``$CONTINUAL_KILL_AT`` is ``point:task`` (fault-injection tests only)."""
    if os.environ.get(KILL_ENV) == f"{point}:{task}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a flushed temporary file and a rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        json.dump(obj, handle, indent=1, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        _fsync(path.parent)
    except OSError:  # some filesystems do not fsync folders
        pass


def config_hash(flat: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(flat), sort_keys=True, default=str).encode()).hexdigest()


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   allowed: Iterable[str] = RESUMABLE_CHANGES) -> List[str]:
    """The keys whose values differ between two flat configs (``allowed`` ones excepted), sorted."""
    keys = set(saved) | set(current)
    same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    return sorted(k for k in keys if k not in set(allowed) and not same(saved.get(k), current.get(k)))


@dataclass
class SavedState:
    """One generation of a run's state, read back and verified."""

    folder: Path
    finished: int  # tasks (rows of the accuracy matrix) finished
    tensors: Dict[str, Dict[str, torch.Tensor]]  # group ("model", "strategy", "router", "plugins", "rng") -> tensors
    data: Dict[str, Any]  # JSON: results, records, RNG and plugin metadata, tracking
    config: Dict[str, Any]  # the flat config the run was started with
    status: str = "running"  # or "finished"
    manifest: Dict[str, Any] = field(default_factory=dict)


def has_state(run_dir: Path) -> bool:
    return (Path(run_dir) / STATE_DIR / MANIFEST).is_file()


def write_state(run_dir: Path, finished: int, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                data: Mapping[str, Any], config: Mapping[str, Any], status: str = "running") -> Path:
    """Write a new generation of the run's state and make it the current one; returns its folder.

    Args:
        run_dir: the run folder.
        finished: tasks finished (the new generation continues at task ``finished``).
        tensors: group -> name -> tensor (one safetensors file per group).
        data: JSON-serialisable state.
        config: the run's flat config (its hash goes in the manifest).
        status: "running", or "finished" once the run wrote its final artifacts.
    """
    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    files: Dict[str, Dict[str, Any]] = {}
    groups = list(tensors.items())
    for i, (group, named) in enumerate(groups):
        path = tmp / f"{group}.safetensors"
        # safetensors refuses tensors sharing storage (tied weights): independent contiguous copies.
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()}, str(path))
        _fsync(path)
        if i == len(groups) // 2:
            kill_point("write", finished - 1)  # a kill halfway through writing a generation
    path = tmp / "state.json"
    with open(path, "w") as handle:
        json.dump({"finished": finished, **data, "config": dict(config)}, handle, allow_nan=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    for path in sorted(tmp.iterdir()):
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    folder = root / f"after-task-{finished:04d}-{uuid.uuid4().hex[:6]}"
    os.replace(tmp, folder)
    manifest_path = root / MANIFEST
    current = _read_manifest(manifest_path) if manifest_path.is_file() else {}
    previous = current.get("latest")
    if previous is not None and previous.get("finished") == finished:  # rewriting the same point: keep its previous
        previous = current.get("previous")
    manifest = {
        "format": FORMAT_VERSION,
        "status": status,
        "config_sha256": config_hash(config),
        "latest": {"folder": folder.name, "finished": finished, "files": files},
        "previous": previous,
    }
    write_json_atomic(manifest_path, manifest)
    keep = {folder.name} | ({previous["folder"]} if previous else set())
    for other in root.iterdir():  # older generations and temporary folders of killed writes
        if other.is_dir() and other.name not in keep:
            shutil.rmtree(other, ignore_errors=True)
    return folder


def mark_finished(run_dir: Path) -> None:
    """Record that the run finished (its final artifacts are written): ``resume`` then changes nothing. The
    generation before the last is no longer needed and is removed."""
    root = Path(run_dir) / STATE_DIR
    manifest = _read_manifest(root / MANIFEST)
    previous = manifest.get("previous")
    manifest.update(status="finished", previous=None)
    write_json_atomic(root / MANIFEST, manifest)
    if previous:
        shutil.rmtree(root / previous["folder"], ignore_errors=True)


def _read_manifest(path: Path) -> Dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunStateError(f"{path}: the run-state manifest is unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "latest" not in manifest:
        raise RunStateError(f"{path}: not a run-state manifest of format {FORMAT_VERSION}")
    return manifest


def read_state(run_dir: Path, previous: bool = False) -> SavedState:
    """The current generation of ``run_dir``'s state (or the one before it), every file's checksum verified.

    Raises:
        RunStateError: no state, a manifest that cannot be read, or a file whose checksum does not match (named,
            with the previous good generation if there is one; nothing is deleted).
    """
    run_dir = Path(run_dir)
    manifest_path = run_dir / STATE_DIR / MANIFEST
    if not manifest_path.is_file():
        if not (run_dir / "config.yaml").is_file():
            raise RunStateError(f"{run_dir} is not a run folder (no config.yaml and no {STATE_DIR}/{MANIFEST})")
        raise RunStateError(f"{run_dir}: no task finished yet (no {STATE_DIR}/{MANIFEST}); start the run again")
    manifest = _read_manifest(manifest_path)
    entry = manifest.get("previous") if previous else manifest["latest"]
    if entry is None:
        raise RunStateError(f"{manifest_path}: there is no previous generation to fall back to")
    folder = run_dir / STATE_DIR / entry["folder"]
    fallback = manifest.get("previous") if not previous else None
    hint = (f"; the previous good state (after task {fallback['finished']}) is kept in "
            f"{run_dir / STATE_DIR / fallback['folder']}: `continual resume {run_dir} --previous` continues from it"
            if fallback else "; no earlier state is kept")
    for name, info in entry["files"].items():
        path = folder / name
        if not path.is_file():
            raise RunStateError(f"state file {path} is missing{hint}")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise RunStateError(f"state file {path} is corrupt or truncated (its checksum does not match the "
                                f"manifest){hint}")
    try:
        data = json.loads((folder / "state.json").read_text())
        tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    except Exception as err:  # checksums matched, so this is a bug or a foreign file: name it
        raise RunStateError(f"{folder}: state files cannot be read ({type(err).__name__}: {err})") from err
    config = data.pop("config", {})
    finished = int(data.pop("finished"))
    return SavedState(folder=folder, finished=finished, tensors=tensors, data=data, config=config,
                      status=manifest.get("status", "running") if not previous else "running", manifest=manifest)


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state(device: Optional[torch.device] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, JSON) of Python's, NumPy's and torch's global generators (and CUDA's when used)."""
    tensors = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------- model


def parameter_fingerprints(model: torch.nn.Module) -> Dict[str, Tuple[float, float]]:
    """A cheap fingerprint (sum and sum of squares, float64) of every parameter and buffer, by name: what a
    freshly built model holds, to find later which tensors changed."""
    out = {}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=False).items():
            t = tensor.detach().double() if tensor.is_floating_point() else tensor.detach().to(torch.float64)
            out[name] = (float(t.sum()), float((t * t).sum()))
    return out


def changed_tensors(model: torch.nn.Module, baseline: Mapping[str, Tuple[float, float]],
                    trained: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """The model's state-dict entries a freshly built model does not hold: new ones (modules allocated per task),
    those named in ``trained``, and those whose fingerprint changed."""
    trained = set(trained)
    now = parameter_fingerprints(model)
    state = model.state_dict()
    return {k: v for k, v in state.items() if k not in baseline or k in trained or now[k] != baseline[k]}


def load_model_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], backbone: str) -> None:
    """Load saved tensors into a model rebuilt with the same structure.

    Raises:
        RunStateError: a saved tensor the model does not have, or one of another shape (the run folder belongs to
            another backbone or strategy configuration).
    """
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in tensors
             if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if unknown or wrong:
        detail = (f"tensors this model does not have: {unknown[:3]}" if unknown else f"shapes differ: {wrong[:3]}")
        raise RunStateError(f"the saved model state does not fit the model built from backbone {backbone!r} "
                            f"({detail}); the run folder belongs to another backbone or strategy configuration")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))


# ---------------------------------------------------------------------------------------------------- plugins


def plugin_state(plugins: Iterable[Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, JSON) of the Avalanche plugins a strategy trains with (EWC, LwF, replay).

    Raises:
        RunStateError: a plugin whose state this module cannot save (the run could not be resumed exactly).
    """
    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Any] = {}
    for i, plugin in enumerate(plugins):
        kind = type(plugin).__name__
        key = f"{i}.{kind}"
        if kind == "EWCPlugin":
            for store, name in ((plugin.saved_params, "saved"), (plugin.importances, "importance")):
                for exp, params in store.items():
                    for pname, pdata in params.items():
                        tensors[f"{key}.{name}.{exp}.{pname}"] = pdata.data
            meta[key] = {"saved": sorted(int(e) for e in plugin.saved_params),
                         "importance": sorted(int(e) for e in plugin.importances)}
        elif kind == "LwFPlugin":
            lwf = plugin.lwf
            meta[key] = {"expcount": int(lwf.expcount),
                         "classes": {str(t): sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()}}
        elif kind == "ReplayPlugin":
            policy = plugin.storage_policy
            groups = {}
            for gid, group in policy.buffer_groups.items():
                xs, ys, ts = _dataset_tensors(group.buffer)
                tensors[f"{key}.{gid}.x"], tensors[f"{key}.{gid}.y"], tensors[f"{key}.{gid}.t"] = xs, ys, ts
                tensors[f"{key}.{gid}.weights"] = group._buffer_weights
                groups[str(gid)] = {"max_size": int(group.max_size)}
            meta[key] = {"num_exps": int(getattr(policy, "_num_exps", len(groups))), "groups": groups,
                         "policy": type(policy).__name__}
            if type(policy).__name__ != "ExperienceBalancedBuffer":
                raise RunStateError(f"replay storage policy {type(policy).__name__} cannot be saved for resuming")
        elif callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)):
            for name, value in plugin.state_dict().items():  # a plugin that saves itself (tensors only)
                tensors[f"{key}.own.{name}"] = value
            meta[key] = {"own": True}
        else:
            raise RunStateError(f"the strategy's Avalanche plugin {kind} keeps state this run cannot save (it has no "
                                "state_dict/load_state_dict), so the run cannot be resumed after a kill")
    return tensors, meta


def _dataset_tensors(dataset) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, ts = [], [], []
    for item in dataset:
        xs.append(torch.as_tensor(item[0]))
        ys.append(int(item[1]))
        ts.append(int(item[-1]))
    if not xs:
        return torch.zeros(0, 2, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ts)


def load_plugin_state(plugins: Iterable[Any], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                      model: torch.nn.Module, make_dataset) -> None:
    """Inverse of :func:`plugin_state`, on the plugins of a freshly built strategy and the restored ``model``.

    Args:
        make_dataset: ``(x [N, 2, L], targets [N], task labels [N]) -> AvalancheDataset`` for the replay memory.
    """
    for i, plugin in enumerate(plugins):
        kind = type(plugin).__name__
        key = f"{i}.{kind}"
        info = meta.get(key)
        if info is None:
            raise RunStateError(f"the saved state has nothing for plugin {kind}; the run folder belongs to another "
                                "strategy")
        if kind == "EWCPlugin":
            from avalanche.training.utils import ParamData

            for store, name in ((plugin.saved_params, "saved"), (plugin.importances, "importance")):
                for exp in info[name]:
                    prefix = f"{key}.{name}.{exp}."
                    store[exp] = {k[len(prefix):]: ParamData(k[len(prefix):], tuple(v.shape), init_tensor=v.clone())
                                  for k, v in tensors.items() if k.startswith(prefix)}
        elif kind == "LwFPlugin":
            lwf = plugin.lwf
            lwf.expcount = info["expcount"]
            for task, classes in info["classes"].items():
                lwf.prev_classes_by_task[int(task)] = set(classes)
            if lwf.expcount:
                # The teacher is the model as it was after the last finished task: the restored model itself (LwF
                # copies it in training mode, so its dropout runs as it did).
                lwf.prev_model = copy.deepcopy(model).train()
        elif kind == "ReplayPlugin":
            from avalanche.training.storage_policy import ReservoirSamplingBuffer

            policy = plugin.storage_policy
            policy._num_exps = info["num_exps"]
            for gid, group_info in info["groups"].items():
                group = ReservoirSamplingBuffer(group_info["max_size"])
                prefix = f"{key}.{gid}."
                group.buffer = make_dataset(tensors[prefix + "x"], tensors[prefix + "y"], tensors[prefix + "t"])
                group._buffer_weights = tensors[prefix + "weights"].clone()
                policy.buffer_groups[int(gid)] = group
        elif info.get("own"):
            prefix = f"{key}.own."
            plugin.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        else:
            raise RunStateError(f"the strategy's Avalanche plugin {kind} has no resumable state here")
