"""Using a run after it ran: reload its model from the run folder, evaluate it again, and ask it for predictions.

``continual eval RUN_DIR [key=value ...]`` rebuilds the model from the run's ``config.yaml`` and the state it kept
after its last finished task (:mod:`continual.training.run_state`) and evaluates every task's test split; without
overrides it reproduces the run's last row exactly. ``stream.*`` overrides point it at other splits, sizes or tasks
(a task the run never learnt is answered through the run's router and scored by label string).

``continual predict RUN_DIR --input FILE.jsonl [--task NAME] [--output FILE]`` writes one JSON line per input: the
predicted label, the task whose modules answered and the probability of the label. Without ``--task`` the run's
router decides (a run routed by the task id needs ``--task``). From Python::

    run = continual.load_run("outputs/standard-order1/delta-minilm-taskhead-seed0")
    run.predict(["The match ended 2-1 after extra time."])           # the router decides
    run.predict(["Great film!"], task="amazon")                       # the task is given
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from continual.config import ConfigError, flatten
from continual.training.experiment import load_run_config
from continual.training.run_state import RunStateError, config_changes

# Overrides that leave the trained model as it was: where and how it runs, and what it is evaluated on.
_FREE_PREFIXES = ("stream.", "training.device", "training.eval_batch_size", "training.progress", "tracking.")
_TEXT_KEYS = ("text", "sentence", "input", "content")


@dataclass
class Prediction:
    label: str
    task: Optional[str]  # the task whose modules and head answered (None: a shared head over every label)
    confidence: float  # the label's probability among the answering task's labels

    def to_dict(self) -> Dict:
        return {"label": self.label, "task": self.task, "confidence": round(self.confidence, 6)}


class LoadedRun:
    """A finished (or killed) run's model, rebuilt from its folder; see the module docstring."""

    def __init__(self, run_dir: Path, parts, state, eval_cfg):
        self.run_dir, self.parts, self.state, self.eval_cfg = run_dir, parts, state, eval_cfg
        self.model = parts.model
        self.model.eval()
        self.task_names = [t.name for t in parts.tasks]
        self.finished = state.finished  # tasks learnt

    @property
    def routed(self) -> bool:
        """Whether the run infers the task from the input (a router other than the oracle)."""
        return self.parts.router is not None

    def _task_index(self, task: str) -> int:
        learnt = self.task_names[: self.finished] if not self.parts.strategy.trains_jointly else self.task_names
        if task not in learnt:
            raise ConfigError(f"task {task!r} was not learnt by this run; it learnt: {', '.join(learnt) or '(none)'}")
        return self.task_names.index(task)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], task: Optional[str] = None, batch_size: Optional[int] = None) -> List[Prediction]:
        """One :class:`Prediction` per text. ``task`` names the task the texts belong to; None lets the router
        decide (required for a run routed by the task id, unless its head is shared)."""
        from streams.tokenize import encode_texts

        if task is None and not self.routed and getattr(self.model.heads, "mode", "") != "shared":
            raise ConfigError(
                f"{self.run_dir} routes by the task id (router.name=oracle): give the task of the inputs "
                f"(--task NAME; one of {', '.join(self.task_names[: self.finished])})"
            )
        index = self._task_index(task) if task is not None else None
        cfg = self.parts.cfg
        x_all = encode_texts(list(texts), self.parts.tokenizer, cfg.stream.max_length)
        size = batch_size or cfg.training.eval_batch_size
        out: List[Prediction] = []
        for start in range(0, len(x_all), size):
            x = x_all[start:start + size].to(self.parts.device)
            tasks = None if index is None else torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
            probs, answering = self.model.answer(x, tasks)
            best = probs.argmax(-1)
            for p, b, t in zip(probs.cpu(), best.cpu().tolist(), answering.cpu().tolist()):
                out.append(Prediction(self.model.label_of(t, b), None if t < 0 else self.task_names[t], float(p[b])))
        self.model.routing_log.clear()
        return out

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Accuracy (0..1) on the test split of every task of the evaluation stream (the run's own, unless
        ``stream.*`` overrides changed it): learnt tasks exactly as the run evaluated them, other tasks by label
        string through the router."""
        from streams.build import build_stream

        cfg, parts = self.eval_cfg, self.parts
        same_stream = flatten(cfg.stream) == flatten(parts.cfg.stream)
        stream = parts.stream if same_stream else build_stream(cfg.stream, parts.tokenizer, progress=cfg.training.progress)
        batch = cfg.training.eval_batch_size
        accs: Dict[str, float] = {}
        for task in stream.tasks:
            test = task.test.with_format("torch", columns=["input_ids", "attention_mask", "label"])[:]
            x_all = torch.stack([test["input_ids"].long(), test["attention_mask"].long()], dim=1)
            labels = test["label"].tolist()
            name = task.info.name
            if name in self.task_names:
                index = self.task_names.index(name)
                if tuple(task.info.labels) != tuple(parts.tasks[index].labels):
                    raise ConfigError(f"task {name!r}: its labels {list(task.info.labels)} differ from those the run "
                                      f"learnt {list(parts.tasks[index].labels)}")
                target = self.model.heads.target_index(index)
                correct = 0
                for start in range(0, len(labels), batch):
                    x = x_all[start:start + batch].to(parts.device)
                    gold = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
                    pred = self.model(x, gold).argmax(-1).cpu()
                    correct += int((pred == torch.tensor([target[y] for y in labels[start:start + batch]])).sum())
                accs[name] = correct / len(labels)
            else:  # a task the run never saw: the router picks modules, the label string decides
                if not self.routed and getattr(self.model.heads, "mode", "") != "shared":
                    raise ConfigError(f"task {name!r} was not learnt by this run and the run routes by the task id; "
                                      "evaluate it with a routed run (router.name other than oracle)")
                texts = list(task.data.test.texts)
                predictions = self.predict(texts)
                gold = [task.info.labels[y] for y in task.data.test.labels]
                accs[name] = float(np.mean([p.label == g for p, g in zip(predictions, gold)]))
        self.model.routing_log.clear()
        return accs


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), previous: bool = False) -> LoadedRun:
    """Rebuild a run's model from its folder (the state after its last finished task).

    Args:
        run_dir: the run folder (``tracking.output_dir/<experiment>/<run name>``).
        overrides: ``key=value`` changes that leave the trained model alone (``stream.*`` for evaluation,
            ``training.device``, ``training.eval_batch_size``).
        previous: use the generation before the last (when the last is corrupt).

    Raises:
        RunStateError: not a run folder, no finished task, a corrupt state, or a state that does not fit the model.
        ConfigError: an override that would change the trained model (the keys are named).
    """
    from continual.training.classification import build_parts, restore
    from continual.training.run_state import read_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunStateError(f"{run_dir} is not a run folder (it has no config.yaml)")
    run_cfg = load_run_config(run_dir / "config.yaml", [])
    eval_cfg = load_run_config(run_dir / "config.yaml", list(overrides))
    changed = [k for k in config_changes(flatten(run_cfg), flatten(eval_cfg), allowed=())
               if not k.startswith(_FREE_PREFIXES)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: these would change the trained model; a saved run is evaluated "
                          "with its own config (stream.*, training.device and training.eval_batch_size may change)")
    state = read_state(run_dir, previous=previous)
    model_cfg = load_run_config(run_dir / "config.yaml", [o for o in overrides if o.split("=", 1)[0].strip()
                                                          .startswith(("training.", "tracking."))])
    parts = build_parts(model_cfg)
    restore(parts, state)
    return LoadedRun(run_dir, parts, state, eval_cfg)


def eval_run(run_dir: str | Path, overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> Dict[str, float]:
    """``continual eval``: evaluate the reloaded model, print each task's accuracy next to the run's last row, and
    write ``eval.json`` in the run folder."""
    run = load_run(run_dir, overrides)
    accs = run.evaluate()
    last = run.state.data["result"]["matrix"][run.finished - 1] if run.finished else []
    recorded = dict(zip(run.state.data["result"]["task_names"], last))
    echo(f"{run.run_dir}: model after {run.finished} of {len(run.task_names)} tasks")
    width = max(len(n) for n in accs) + 2
    echo(f"{'task':{width}s}{'accuracy':>10s}{'run (last row)':>16s}")
    for name, acc in accs.items():
        old = recorded.get(name)
        echo(f"{name:{width}s}{100 * acc:10.2f}{'' if old is None else f'{100 * old:16.2f}'}")
    mean = float(np.mean(list(accs.values())))
    echo(f"{'mean':{width}s}{100 * mean:10.2f}")
    (Path(run_dir) / "eval.json").write_text(json.dumps({"accuracy": accs, "mean": mean, "overrides": list(overrides),
                                                         "tasks_learnt": run.finished}, indent=2) + "\n")
    return accs


def read_inputs(path: Path) -> List[str]:
    """Texts from a JSON-lines file: each line an object with ``text`` (or ``sentence``, ``input``, ``content``),
    or a JSON string.

    Raises:
        ConfigError: an unreadable file or a line without text (its number is named).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--input {path}: cannot be read as UTF-8 text ({err})") from err
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--input {path}, line {number}: not JSON ({err.msg})") from err
        if isinstance(item, dict):
            item = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise ConfigError(f"--input {path}, line {number}: expected a JSON string or an object with one of "
                              f"{', '.join(_TEXT_KEYS)}")
        texts.append(item)
    if not texts:
        raise ConfigError(f"--input {path}: no inputs")
    return texts


def predict_file(run_dir: str | Path, input_path: str | Path, task: Optional[str] = None,
                 output: Optional[str | Path] = None, overrides: Sequence[str] = (),
                 echo: Callable[[str], None] = print) -> List[Prediction]:
    """``continual predict``: one JSON line per input (``text``, ``label``, ``task``, ``confidence``) to ``output``
    or the terminal."""
    texts = read_inputs(Path(input_path))
    run = load_run(run_dir, overrides)
    predictions = run.predict(texts, task=task)
    lines = [json.dumps({"text": t, **p.to_dict()}, ensure_ascii=False) for t, p in zip(texts, predictions)]
    if output:
        Path(output).write_text("\n".join(lines) + "\n", encoding="utf-8")
        echo(f"{len(lines)} predictions written to {output}")
    else:
        for line in lines:
            echo(line)
    return predictions
