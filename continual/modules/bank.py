"""Per-task modules at sites of a frozen backbone, mixed per sample by a router.

One abstraction serves every method that allocates modules per task (delta tuning now, experts later):

- a **site** (:class:`TaskModuleSite`) replaces one linear layer of the backbone in place, keeps the original as
  ``base`` (frozen, untouched) and holds one *slot* of delta parameters per task, of one kind (LoRA, adapter, ...);
- a **router** turns each sample's task id into weights over slots, ``[B] -> [B, K]`` (:func:`routing_weights`
  for the three cross-task compositions; an inferred router or a mixture-of-experts gate plugs in at the same
  place);
- the :class:`Routing` of a model is shared by all its sites: the classifier sets the batch's task ids around the
  backbone call, every site reads the same slot weights;
- the :class:`ModuleBank` attaches sites, allocates, freezes, saves and loads one task's modules at every site.

Thousands of tasks in one model: each kind keeps its slots stacked on the device
(:class:`~continual.modules.deltas.stacking.SlotParameters`), and every forward finds once which slots its samples use
(:meth:`Routing.selection`, one device sync); sites read only those, so a mixed batch costs what its own tasks need,
not what the bank stores.

Compositions across tasks (Progressive Prompts, Razdaibiedina et al. 2023, for the sequential one):
``isolated`` (a task-``j`` sample uses slot ``j`` only), ``sequential`` (slots ``0..j``: task ``t`` trains on top
of the frozen earlier ones), ``simultaneous`` (every allocated slot, summed).
"""

from __future__ import annotations

import copy
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from continual.modules.deltas import get_delta_kind
from continual.modules.deltas.stacking import SlotParameters, SlotSelection, select_slots
from continual.modules.families import MODEL_TYPES, model_type_of

COMPOSITIONS = ("isolated", "sequential", "simultaneous")

# ---------------------------------------------------------------------------------------------------- routing
def routing_weights(task_ids: torch.Tensor, trained_tasks: Iterable[int], n_slots: int, mode: str) -> torch.Tensor:
    """Per-sample weights over task slots for a cross-task composition.

    Args:
        task_ids: ``[B]`` integer task id of each sample (slot ``k`` belongs to task ``k``).
        trained_tasks: the slots that may act (allocated ones); others get weight 0.
        n_slots: ``K``, the number of slots.
        mode: "isolated" (slot ``== task id``), "sequential" (slots ``<= task id``) or "simultaneous" (all).

    Returns:
        ``[B, K]`` float32 of 0s and 1s; a sample with no active slot gets an all-zero row.
    """
    if mode not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {list(COMPOSITIONS)}, got {mode!r}")
    slots = torch.arange(n_slots, device=task_ids.device)
    if isinstance(trained_tasks, range) and trained_tasks == range(n_slots):  # every slot (no list of K ids)
        active = torch.ones(n_slots, dtype=torch.bool, device=task_ids.device)
    else:
        active = torch.zeros(n_slots, dtype=torch.bool, device=task_ids.device)
        trained = [k for k in trained_tasks]
        if trained:
            active[torch.tensor(trained, dtype=torch.long, device=task_ids.device)] = True
    ids = task_ids.long()[:, None]
    if mode == "isolated":
        mask = slots[None, :] == ids
    elif mode == "sequential":
        mask = slots[None, :] <= ids
    else:
        mask = torch.ones(task_ids.shape[0], n_slots, dtype=torch.bool, device=task_ids.device)
    return (mask & active[None, :]).float()


class TaskRouter(Protocol):
    """Maps a batch's task ids to slot weights. Inferred routers (no task id at test time) implement this too."""

    # True when every sample gets at most one non-zero slot weight (sites may then gather instead of mixing).
    exclusive: bool

    def weights(self, task_ids: torch.Tensor, n_slots: int) -> torch.Tensor:
        """``[B]`` task ids -> ``[B, K]`` slot weights."""


@dataclass(frozen=True)
class TaskIdRouter:
    """Route by the given task id with one of the three compositions; every allocated slot may act."""

    mode: str = "isolated"

    def __post_init__(self):
        if self.mode not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {list(COMPOSITIONS)}, got {self.mode!r}")

    @property
    def exclusive(self) -> bool:
        return self.mode == "isolated"

    def weights(self, task_ids: torch.Tensor, n_slots: int) -> torch.Tensor:
        return routing_weights(task_ids, range(n_slots), n_slots, self.mode)


class Routing:
    """The routing of one forward pass, shared by every site of one model.

    ``with routing.route(task_ids): backbone(...)`` makes the batch's task ids visible to the sites; the slot
    weights and the :class:`~continual.modules.deltas.stacking.SlotSelection` (the slots the batch uses, found with
    one device sync) are computed once per forward and reused by every site.
    """

    def __init__(self, router: TaskRouter):
        self.router = router
        self.task_ids: Optional[torch.Tensor] = None  # [B] while a forward runs, else None
        self._weights: Dict[int, torch.Tensor] = {}
        self._selections: Dict[int, SlotSelection] = {}
        self._host_extra: Optional[torch.Tensor] = None  # the `extra` of the last selection, on the host
        # Virtual-token group -> (first position, number of positions) in the current forward's sequence;
        # set by ModuleBank.prepare_inputs.
        self.virtual: Dict[int, Tuple[int, int]] = {}
        self._given: Optional[torch.Tensor] = None  # [B, K'] slot weights given to route(), else None
        self.bypass = False  # set by route(..., bypass=True): sites act as their base modules

    @property
    def mode(self) -> Optional[str]:
        return getattr(self.router, "mode", None)

    @property
    def exclusive(self) -> bool:
        if self._given is not None:
            return False  # given weights may mix slots
        return bool(self.router.exclusive)

    @contextmanager
    def route(self, task_ids: torch.Tensor, weights: Optional[torch.Tensor] = None,
              bypass: bool = False) -> Iterator["Routing"]:
        """Set the per-sample task ids ``[B]`` for the forward passes run inside the block.

        Args:
            weights: ``[B, K']`` slot weights to use instead of the router's (an inferred or soft route); slots
                beyond ``K'`` get weight 0, so ``[B, 0]`` runs the bare backbone (no module acts).
            bypass: every site returns its base module's output and computes nothing of its own: the bare backbone
                at its own cost (no virtual tokens to prepare either), e.g. for a router's features.
        """
        if self.task_ids is not None:
            raise RuntimeError("routing is already set: forward passes through one bank cannot be nested")
        if task_ids.dim() != 1:
            raise ValueError(f"task ids must have shape [B], got {tuple(task_ids.shape)}")
        if weights is not None and (weights.dim() != 2 or weights.shape[0] != task_ids.shape[0]):
            raise ValueError(f"slot weights must have shape [B, K] with B={task_ids.shape[0]}, got {tuple(weights.shape)}")
        self.task_ids, self._weights, self.virtual, self._given, self.bypass = task_ids, {}, {}, weights, bypass
        self._selections = {}
        try:
            yield self
        finally:
            self.task_ids, self._weights, self.virtual, self._given, self.bypass = None, {}, {}, None, False
            self._selections = {}

    def weights(self, n_slots: int) -> torch.Tensor:
        """``[B, K]`` slot weights of the current forward."""
        if self.task_ids is None:
            raise RuntimeError(
                "no routing is set: run the backbone through ContinualClassifier, or inside bank.route(task_ids)"
            )
        if n_slots not in self._weights:
            given = self._given
            if given is None:
                self._weights[n_slots] = self.router.weights(self.task_ids, n_slots)
            else:
                given = given[:, :n_slots].float()
                self._weights[n_slots] = torch.nn.functional.pad(given, (0, n_slots - given.shape[1]))
        return self._weights[n_slots]

    def selection(self, n_slots: int, extra: Optional[torch.Tensor] = None) -> SlotSelection:
        """The slots this forward's samples use and their weights over those only (one device sync per forward).

        Args:
            n_slots: ``K``.
            extra: a small integer tensor to bring to the host in the same copy (see :meth:`host_value`).
        """
        if n_slots not in self._selections:
            selection, host = select_slots(self.weights(n_slots), self.exclusive, extra)
            self._selections[n_slots] = selection
            self._host_extra = host
        return self._selections[n_slots]

    def host_value(self, value: torch.Tensor, n_slots: int) -> torch.Tensor:
        """``value`` (a small integer tensor) on the host, copied together with the forward's slot selection when
        that is still to be found: the classifier's padding trim and the routing then cost one device sync."""
        if n_slots == 0 or self.bypass or n_slots in self._selections:
            return value.cpu()
        self.selection(n_slots, value)
        return self._host_extra.reshape(value.shape)

    def single_slot(self, n_slots: int) -> Optional[int]:
        """The slot when every sample of the batch uses exactly that one slot with weight 1, else None.

        The usual training batch (one task) takes this path: sites then run one slot's modules directly, with no
        gathering or mixing. Read from :meth:`selection` (the forward's one device sync), shared by every site.
        """
        return self.selection(n_slots).single

    def span(self, group: int) -> Tuple[int, int]:
        """(first position, count) of a virtual-token group in the current sequence."""
        if group not in self.virtual:
            raise RuntimeError(
                "prompt/prefix deltas add virtual tokens: prepare the inputs with bank.prepare_inputs(...) inside "
                "bank.route(task_ids) (ContinualClassifier does this)"
            )
        return self.virtual[group]


# ---------------------------------------------------------------------------------------------------- sites
def linear_dims(module: nn.Module) -> Tuple[int, int, torch.Tensor]:
    """(in_features, out_features, weight) of an nn.Linear, a GPT-2 Conv1D or a site wrapping either."""
    if isinstance(module, TaskModuleSite):
        return module.in_features, module.out_features, module.weight
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.weight
    if is_conv1d(module):  # GPT-2's transposed linear: weight [in, out]
        return module.weight.shape[0], module.weight.shape[1], module.weight
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D``: a linear that stores its weight transposed, ``[in, out]``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the bank itself
        return False
    return isinstance(module, Conv1D)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, TaskModuleSite)) or is_conv1d(module)


def _site_dims(base: nn.Module, delta: nn.Module) -> Tuple[int, int]:
    """(in, out) widths a site reports: the linear's, an embedding's (vocabulary, width), or what the kind says."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if _is_linear(base):
        return linear_dims(base)[:2]
    return int(getattr(delta, "in_features", 0)), int(getattr(delta, "out_features", 0))


def _last_layer_index(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value - 1
    raise ValueError(f"{type(model).__name__}: cannot tell its number of layers for a '{{last}}' target")


class TaskModuleSite(nn.Module):
    """A linear layer of the backbone with per-task delta modules of one kind.

    ``forward(x)`` returns ``base(x) + delta(x, base(x), w)`` where ``w: [B, K]`` are the slot weights of the
    current :class:`Routing`; with no slots allocated it is exactly ``base(x)``.

    Args:
        base: the wrapped ``nn.Linear`` (or GPT-2 ``Conv1D``, or another site: kinds stack); never modified.
        delta: the kind's per-task modules (a :class:`~continual.modules.deltas.TaskDelta`).
        routing: the model's shared routing.
        options: the kind options ``delta`` was built with (for parameter formulas).
    """

    def __init__(self, base: nn.Module, delta: nn.Module, routing: Routing, options: Optional[dict] = None):
        super().__init__()
        self.in_features, self.out_features = _site_dims(base, delta)
        self.base = base
        self.delta = delta
        self.routing = routing
        self.options = dict(options or {})
        if not isinstance(base, TaskModuleSite):
            base.requires_grad_(False)

    # Code that inspects a linear's weight (dtype, device) keeps working on the wrapped layer.
    @property
    def weight(self) -> torch.Tensor:
        if hasattr(self.base, "weight"):
            return self.base.weight
        return next(self.base.parameters())  # a block without one weight (an FFN): for device and dtype only

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base, "bias", None)

    @property
    def n_slots(self) -> int:
        return self.delta.n_slots

    def add_slot(self) -> None:
        self.delta.add_slot(device=self.weight.device, dtype=self.weight.dtype)

    def slot_parameter_count(self) -> int:
        """One task's stored parameters at this site, by the kind's formula."""
        return type(self.delta).slot_parameter_count(self.in_features, self.out_features, **self.options)

    def __getattr__(self, name: str):
        # Attributes the backbone reads from the module it put here (e.g. an embedding's ``embedding_dim``,
        # a Conv1D's ``nf``) resolve on the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = None if name.startswith("_") else self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ..., in] -> [B, ..., out]."""
        h = self.base(x)
        n_slots = self.delta.n_slots
        if n_slots == 0 or self.routing.bypass:
            return h
        selection = self.routing.selection(n_slots)  # the slots this batch uses: per-forward work is O(those)
        if selection.weights.shape[0] != x.shape[0]:
            raise ValueError(f"routing has {selection.weights.shape[0]} task ids but the site got a batch of {x.shape[0]}")
        if getattr(self.delta, "virtual_tokens", False):  # prompt / prefix: write the virtual positions
            return self.delta.place(h, selection, self.routing.span(self.delta.group))
        if getattr(self.delta, "wraps", "linear") != "linear":
            return h + self.delta(x, h, selection)
        if selection.single is not None and hasattr(self.delta, "forward_slot"):
            # the whole batch is one task: that slot's modules, no gather or mix
            return h + self.delta.forward_slot(x, h, selection.single)
        if not selection.ids:  # no sample has a module here
            return h
        B = x.shape[0]
        x3, h3 = x.reshape(B, -1, x.shape[-1]), h.reshape(B, -1, h.shape[-1])  # [B, T, in], [B, T, out]
        change = self.delta(x3, h3, selection)
        return (h3 + change).reshape(h.shape)

    def merged(self, weights: torch.Tensor) -> nn.Module:
        """A plain copy of the base linear with the mix ``weights: [K]`` of this site's slots folded in."""
        base = self.base.merged(weights) if isinstance(self.base, TaskModuleSite) else copy.deepcopy(self.base)
        dW, db = self.delta.weight_delta(weights.to(self.weight.device))
        with torch.no_grad():
            if dW is not None:
                base.weight += dW if isinstance(base, nn.Linear) else dW.T  # Conv1D stores [in, out]
            if db is not None:
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros_like(db), requires_grad=False)
                base.bias += db
        return base


# ---------------------------------------------------------------------------------------------------- bank
def architecture_family(model: nn.Module) -> str:
    """The family (bert, gpt2, llama, t5; :mod:`continual.modules.families`) whose default targets apply to a Hugging
    Face model."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"no default delta targets for model_type {model_type!r} (known: {', '.join(sorted(MODEL_TYPES))}); "
            "pass targets=[regex, ...] naming the linear layers to adapt"
        )
    return MODEL_TYPES[model_type]


class ModuleBank:
    """Per-task modules at sites of one backbone, with the routing they share.

    A plain object, not an ``nn.Module``: the sites live inside the backbone (so ``.to()``, ``state_dict`` and
    optimizers see them once); the bank only knows where they are.

    Args:
        composition: "isolated", "sequential" or "simultaneous" (see the module docstring).
        router: a custom :class:`TaskRouter`; replaces ``composition`` when given.
    """

    def __init__(self, composition: str = "isolated", router: Optional[TaskRouter] = None):
        self.routing = Routing(router if router is not None else TaskIdRouter(composition))
        self._sites: Dict[str, TaskModuleSite] = {}
        # (group, virtual positions per slot) of each attached virtual-token kind
        self._token_groups: List[Tuple[int, int]] = []
        self.n_tasks = 0
        self.frozen: set = set()

    # ------------------------------------------------------------------ building
    def attach(
        self,
        model: nn.Module,
        kind: str,
        targets: Optional[Sequence[str]] = None,
        *,
        select: int = 0,
        select_seed: int = 0,
        **kind_options,
    ) -> List[str]:
        """Put a site of ``kind`` at every module of ``model`` that the kind applies to and ``targets`` match.

        Args:
            model: the backbone (a Hugging Face model for default targets).
            kind: a registered delta kind (see ``continual.modules.DELTA_KINDS``).
            targets: regexes, each matching a dotted suffix of module names (``{last}`` stands for the index of
                the last layer); None or empty: the kind's defaults for ``model.config.model_type``. Kinds that
                wrap the input embedding (prompt tuning) take no targets.
            select: keep only this many of the matched modules, drawn at random with ``select_seed`` (selective
                module tuning); 0 keeps all.
            **kind_options: the kind's options (e.g. ``r=8, alpha=16`` for LoRA).

        Returns:
            The names of the new sites, in model order.

        Raises:
            ValueError: unknown kind or option, a pattern that matches nothing, a bad ``select``, a linear kind
                stacked on a virtual-token site, or tasks already allocated.
        """
        cls = get_delta_kind(kind)
        wraps = getattr(cls, "wraps", "linear")
        unknown = sorted(set(kind_options) - set(cls.options))
        if unknown:
            raise ValueError(f"{kind}: unknown option(s) {unknown}; it takes {list(cls.options) or 'none'}")
        if self.n_tasks:
            raise ValueError("attach every kind before the first task is added")
        if select < 0:
            raise ValueError(f"select must be >= 0, got {select}")

        modules = dict(model.named_modules())
        if wraps == "embedding":
            if targets:
                raise ValueError(f"{kind} sits on the input embedding and takes no targets (got {list(targets)})")
            embedding = model.get_input_embeddings()
            chosen = [name for name, module in modules.items() if module is embedding]
            candidates = chosen
        else:
            chosen, candidates = self._match(model, modules, cls, wraps, targets)
        if select:
            if select > len(chosen):
                raise ValueError(f"select={select} but only {len(chosen)} modules match for {kind}")
            picked = set(random.Random(select_seed).sample(chosen, select))
            chosen = [name for name in chosen if name in picked]

        ours = {id(site) for site in self._sites.values()}
        virtual = bool(getattr(cls, "virtual_tokens", False))
        group = len(self._token_groups) if virtual else None
        for index, name in enumerate(chosen):
            parent_name, _, child = name.rpartition(".")
            base = modules[name]
            if isinstance(base, TaskModuleSite) and getattr(base.delta, "virtual_tokens", False):
                raise ValueError(
                    f"{kind} cannot wrap {name!r}: it already holds {base.delta.kind} virtual tokens; attach "
                    "prompt/prefix kinds after every other kind"
                )
            options = dict(kind_options)
            if "seed" in cls.options:  # kinds with fixed random tensors: a distinct, reproducible seed per site
                options["seed"] = int(kind_options.get("seed", 0)) * 1_000_003 + index
            if wraps == "linear":
                in_features, out_features, _ = linear_dims(base)
                delta = cls(in_features, out_features, **options)
            else:
                delta = cls.from_base(base, **options)
            if virtual:
                delta.group = group
            site = TaskModuleSite(base, delta, self.routing, kind_options)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, site)
            ours.add(id(site))
        if virtual and chosen:
            self._token_groups.append((group, delta.tokens_per_slot))
        # Re-read every site's name: a site wrapped by a new one now lives at "<name>.base".
        self._sites = {n: m for n, m in model.named_modules() if id(m) in ours}
        return chosen

    @staticmethod
    def _match(model, modules, cls, wraps, targets) -> Tuple[List[str], List[str]]:
        """Names of the modules (in model order) matched by ``targets``, and the candidates they came from."""
        if not targets:
            targets = [cls.default_targets[architecture_family(model)]]
        if any("{last}" in target for target in targets):
            last = str(_last_layer_index(model))
            targets = [target.replace("{last}", last) for target in targets]
        compiled = []
        for target in targets:
            try:  # a target names a dotted suffix: "attention.self.query" matches "encoder.layer.0.attention.self.query"
                compiled.append((target, re.compile(rf"(?:^|\.)(?:{target})$")))
            except re.error as err:
                raise ValueError(f"target {target!r} is not a valid regex: {err}") from None
        # Nothing inside a site is a candidate again (its wrapped module, its deltas); the site itself is
        # (kinds stack).
        inside = tuple(name + "." for name, module in modules.items() if isinstance(module, TaskModuleSite))
        wanted = _is_linear if wraps == "linear" else (lambda module: True)
        candidates = [
            name for name, module in modules.items() if name and not name.startswith(inside) and wanted(module)
        ]
        chosen: List[str] = []
        for target, pattern in compiled:
            hits = [name for name in candidates if pattern.search(name)]
            if not hits:
                what = "linear layer" if wraps == "linear" else "module"
                raise ValueError(
                    f"target {target!r} matches no {what} of {type(model).__name__}; some that exist: "
                    f"{', '.join(candidates[:8]) or '(none)'}"
                )
            chosen.extend(name for name in hits if name not in chosen)
        chosen.sort(key=candidates.index)
        return chosen, candidates

    # ------------------------------------------------------------------ tasks
    def add_task(self, task_index: int) -> None:
        """Allocate ``task_index``'s slot at every site (tasks come in order; an allocated task is left as is)."""
        if not self._sites:
            raise ValueError("the bank has no sites: attach a kind first")
        if task_index < self.n_tasks:
            return
        if task_index != self.n_tasks:
            raise ValueError(f"tasks are allocated in order: the next one is {self.n_tasks}, got {task_index}")
        for site in self._sites.values():
            site.add_slot()
        self.n_tasks += 1

    def reserve(self, n_tasks: int) -> None:
        """Keep room for ``n_tasks`` tasks in every site's stacked slots (e.g. the tasks of a stream), so that
        allocating them never copies the tasks stored before (:class:`~continual.modules.deltas.stacking.SlotParameters`)."""
        for site in self._sites.values():
            for module in site.delta.modules():
                if isinstance(module, SlotParameters):
                    module.reserve(n_tasks)

    def _check_task(self, task_index: int) -> None:
        if not 0 <= task_index < self.n_tasks:
            raise ValueError(f"task {task_index} has no modules (allocated: {self.n_tasks})")

    def _task_named_parameters(self, task_index: int, kind: Optional[str] = None) -> Dict[str, nn.Parameter]:
        self._check_task(task_index)
        if kind is not None and kind not in self.kinds():
            raise ValueError(f"no {kind!r} sites in this bank (kinds: {', '.join(self.kinds())})")
        return {
            f"{name}.{role}": param
            for name, site in self._sites.items()
            if kind is None or site.delta.kind == kind
            for role, param in site.delta.slot_parameters(task_index).items()
        }

    def kinds(self) -> List[str]:
        """The kinds attached, in attach order."""
        out: List[str] = []
        for site in self._sites.values():
            if site.delta.kind not in out:
                out.append(site.delta.kind)
        return out

    def task_parameters(self, task_index: int, kind: Optional[str] = None) -> List[nn.Parameter]:
        """The parameters of one task's modules at every site (of one kind only when ``kind`` is given)."""
        return list(self._task_named_parameters(task_index, kind).values())

    def freeze_task(self, task_index: int, kind: Optional[str] = None) -> None:
        """Stop ``task_index``'s modules (of one kind, or all) from training; kinds that train through a
        reparameterisation fold it here, so a frozen task holds only what it stores."""
        self._check_task(task_index)
        for site in self._sites.values():
            if kind is None or site.delta.kind == kind:
                if hasattr(site.delta, "freeze_slot"):
                    site.delta.freeze_slot(task_index)
                for param in site.delta.slot_parameters(task_index).values():
                    param.requires_grad_(False)
        if kind is None:
            self.frozen.add(task_index)

    def task_state(self, task_index: int) -> Dict[str, torch.Tensor]:
        """One task's tensors only, keyed ``"<site>.<role>"`` (e.g. ``"encoder.layer.0.attention.self.query.lora_A"``)."""
        return {key: param.detach() for key, param in self._task_named_parameters(task_index).items()}

    def load_task_state(self, task_index: int, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`task_state` for a stored (frozen) task; allocates it first when it is the next one.

        The task is frozen before loading, so its modules have the structure that was stored.
        """
        if task_index == self.n_tasks:
            self.add_task(task_index)
        self.freeze_task(task_index)
        params = self._task_named_parameters(task_index)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"task {task_index} state: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for key, param in params.items():
                if state[key].shape != param.shape:
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not match {tuple(param.shape)}")
                param.copy_(state[key])

    def prepare_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        """Prepend the virtual positions of prompt/prefix kinds to a right-padded batch (inside :meth:`route`).

        Every virtual-token kind owns a block of positions: with an exclusive routing one block of ``P`` positions
        holding each sample's own slot, otherwise one block of ``P`` per slot that some sample of the batch uses
        (``U`` blocks, not one per stored slot), which a sample sees only where its slot weight is non-zero
        (sequential composition: the prompts of tasks ``<= j``, as in Progressive Prompts). Virtual positions take position id 0 and real tokens keep ``0..T-1``, so a sample
        whose virtual positions are all masked gets exactly the backbone's output.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]``.

        Returns:
            ``(input_ids [B, V+T], attention_mask [B, V+T], position_ids [B, V+T] or None, V)``; with no
            virtual-token kind, the inputs unchanged, None and 0.
        """
        if not self._token_groups or self.n_tasks == 0:
            return input_ids, attention_mask, None, 0
        selection = self.routing.selection(self.n_tasks)
        used = selection.weights != 0  # [B, U]: only the slots some sample uses get positions
        B, T = input_ids.shape
        spans, masks, offset = {}, [], 0
        for group, P in self._token_groups:
            if selection.exclusive:
                visible = used.any(dim=1, keepdim=True).expand(B, P)
            else:
                visible = used.repeat_interleave(P, dim=1)  # [B, U*P]
            spans[group] = (offset, visible.shape[1])
            offset += visible.shape[1]
            masks.append(visible)
        self.routing.virtual = spans
        V = offset
        device = input_ids.device
        ids = torch.cat([input_ids.new_zeros(B, V), input_ids], dim=1)
        mask = torch.cat([torch.cat(masks, dim=1).to(attention_mask.dtype), attention_mask], dim=1)
        positions = torch.cat(
            [torch.zeros(B, V, dtype=torch.long, device=device), torch.arange(T, device=device).expand(B, T)], dim=1
        )
        return ids, mask, positions, V

    def host_value(self, value: torch.Tensor) -> torch.Tensor:
        """Inside :meth:`route`: a small integer tensor on the host, copied with the forward's slot selection (one
        device sync for both; e.g. the classifier's padding trim)."""
        return self.routing.host_value(value, self.n_tasks)

    def continue_inputs(self) -> None:
        """Inside :meth:`route`: this forward continues sequences whose keys and values an earlier forward cached
        (its inputs went through :meth:`prepare_inputs`), so it adds no virtual positions: prompt and prefix kinds
        leave its outputs as they are, and the cached virtual positions stay visible through the caller's attention
        mask (the earlier mask followed by the new tokens')."""
        self.routing.virtual = {group: (0, 0) for group, _ in self._token_groups}

    # ------------------------------------------------------------------ use
    def route(self, task_ids: torch.Tensor, weights: Optional[torch.Tensor] = None, bypass: bool = False):
        """Context manager: forward passes inside it route each sample by its task id ``[B]`` (see
        :meth:`Routing.route` for ``weights`` and ``bypass``)."""
        return self.routing.route(task_ids, weights, bypass)

    def sites(self) -> Dict[str, TaskModuleSite]:
        """Site name (relative to the attached model) -> site, in model order."""
        return dict(self._sites)

    def parameter_count(self, task_index: Optional[int] = None) -> int:
        """Parameters of one task's modules, or of every allocated task's when ``task_index`` is None."""
        tasks = range(self.n_tasks) if task_index is None else [task_index]
        return sum(p.numel() for t in tasks for p in self.task_parameters(t))

    def expected_parameter_count(self) -> int:
        """One task's parameters by each kind's formula (equal to ``parameter_count(t)`` for any task ``t``)."""
        return sum(site.slot_parameter_count() for site in self._sites.values())

    def merged(self, model: nn.Module, task_index: int) -> nn.Module:
        """A copy of ``model`` (the one attached to) serving ``task_index`` with its deltas folded into plain linears.

        Uses the composition's weights for that task (sequential: slots ``0..task``). Only for mergeable kinds
        (LoRA, BitFit); ``model`` itself is not changed.
        """
        self._check_task(task_index)
        for name, site in self._sites.items():
            if model.get_submodule(name) is not site:
                raise ValueError(f"{type(model).__name__} is not the model this bank is attached to (site {name!r})")
        weights = self.routing.router.weights(torch.tensor([task_index]), self.n_tasks)[0]  # [K]
        out = copy.deepcopy(model)
        outer = [n for n in self._sites if not any(n.startswith(m + ".") for m in self._sites)]
        for name in outer:
            parent_name, _, child = name.rpartition(".")
            site = out.get_submodule(name)
            setattr(out.get_submodule(parent_name) if parent_name else out, child, site.merged(weights))
        return out
