"""A continual text classifier: a Hugging Face encoder, a pooling step and task-incremental or shared heads.

Inputs travel through Avalanche as one tensor ``x`` of shape ``[B, 2, L]`` (token ids stacked on the attention
mask, right-padded), so the default collate and ``.to(device)`` work unchanged; the model trims the padding that
no sample in the batch uses before running the encoder.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from continual.models.label_space import label_map
from continual.modules.deltas.stacking import are_views_of, stack_as_views


class TaskHeads(nn.Module):
    """Classification heads.

    ``mode="task"``: one linear head per task, picked by the sample's task label (task-incremental). The heads'
    weights live stacked on the device (each head's weight and bias are views of their rows, padded to the widest
    head), so a batch gathers its samples' heads whatever the number of tasks stored; a head that trains is read as
    its live Parameters.
    ``mode="shared"``: one linear head over the union of all labels of the stream; logits of labels that no task
    trained so far has shown are masked to ``-inf`` (task-agnostic / class-incremental).

    Args:
        hidden: input width.
        task_labels: the label strings of every task of the stream, in stream order.
        mode: "task" or "shared".
    """

    def __init__(self, hidden: int, task_labels: Sequence[Sequence[str]], mode: str = "task"):
        super().__init__()
        if mode not in ("task", "shared"):
            raise ValueError(f"head mode must be 'task' or 'shared', got {mode!r}")
        self.mode = mode
        self.task_labels = [tuple(labels) for labels in task_labels]
        self.shared_labels: List[str] = []
        for labels in self.task_labels:
            for label in labels:
                if label not in self.shared_labels:
                    self.shared_labels.append(label)
        if mode == "task":
            self.heads = nn.ModuleList(nn.Linear(hidden, len(labels)) for labels in self.task_labels)
            self.width = max(len(labels) for labels in self.task_labels)
            self._stacks = None  # ([T, W, H] weights, [T, W] biases, [(weight, bias)] per head); None: to build
            # runs after the heads' own loads (a parent's _load_from_state_dict runs before its children's)
            self.register_load_state_dict_post_hook(TaskHeads._after_load)
        else:
            self.shared = nn.Linear(hidden, len(self.shared_labels))
            self.width = len(self.shared_labels)
            self.register_buffer("active", torch.zeros(self.width, dtype=torch.bool), persistent=True)

    def target_index(self, task: int) -> List[int]:
        """Map a task's local label index to the index this head predicts."""
        if self.mode == "task":
            return list(range(len(self.task_labels[task])))
        return [self.shared_labels.index(label) for label in self.task_labels[task]]

    def activate(self, task: int) -> None:
        """Mark a task's labels as seen (shared mode): from now on they can be predicted."""
        if self.mode == "shared":
            self.active[self.target_index(task)] = True

    def label_map(self) -> torch.Tensor:
        """``[T, T, W, W + 1]`` 0/1: ``M[r, g, i, j] = 1`` when label ``i`` of task ``r``'s head is label ``j`` of task
        ``g`` (by label string), and ``j = W`` (an "other" column no target uses) when task ``g`` has no such label
        (:func:`continual.models.label_space.label_map`)."""
        if getattr(self, "_label_map", None) is None:
            self._label_map = label_map(self.task_labels, self.task_labels, self.width, self.width)
        return self._label_map

    def in_gold_space(self, logits: torch.Tensor, routed: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Express predictions of the routed tasks' heads in the gold tasks' label spaces.

        A prediction is right when its label string equals the gold label string, whichever task's head made it: the
        routed head's probabilities are summed per gold label (labels the gold task does not have go to an extra
        last column that no target uses).

        Args:
            logits: ``[B, W]`` logits of each sample's routed head (``-inf`` on padding).
            routed, gold: ``[B]`` the task each sample was routed to, and its true task.

        Returns:
            ``[B, W + 1]`` log-probabilities over the gold task's labels plus "another task's label".
        """
        mapping = self.label_map().to(logits.device)[routed.long(), gold.long()]  # [B, W, W+1]
        probs = torch.einsum("bw,bwk->bk", torch.softmax(logits.float(), -1), mapping)
        return probs.clamp_min(1e-12).log()

    def parameters_for(self, task: int) -> List[nn.Parameter]:
        return list((self.heads[task] if self.mode == "task" else self.shared).parameters())

    def forward(self, features: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        """features: [B, H]; task_labels: [B] -> logits [B, width] (padding and unseen labels are -inf)."""
        if self.mode == "shared":
            logits = self.shared(features)
            if bool(self.active.any()):
                logits = logits.masked_fill(~self.active, float("-inf"))
            return logits
        # Every task's head padded to the widest one ([T, C, H] weights, -inf bias on padding) and kept stacked,
        # gathered per sample: one batched product whatever the number of tasks, no host sync.
        stacked_weights, stacked_biases, params = self._stacked()
        task_labels = task_labels.to(features.device).long()
        weights, biases = stacked_weights[task_labels], stacked_biases[task_labels]  # [B, C, H], [B, C]
        if torch.is_grad_enabled():  # heads that train are read live, so the gradient reaches them
            live = [t for t, (w, b) in enumerate(params) if w.requires_grad or b.requires_grad]
            if live:
                position = torch.full((len(params),), -1, dtype=torch.long)
                position[live] = torch.arange(len(live))
                pick = position.to(features.device)[task_labels]  # [B]: the sample's live head, -1 for a frozen one
                hit, pick = pick >= 0, pick.clamp_min(0)
                live_weights = torch.stack([self._padded(params[t][0], 0.0) for t in live])  # [R, C, H]
                live_biases = torch.stack([self._padded(params[t][1], float("-inf")) for t in live])  # [R, C]
                weights = torch.where(hit[:, None, None], live_weights[pick], weights)
                biases = torch.where(hit[:, None], live_biases[pick], biases)
        return torch.einsum("bh,bch->bc", features, weights) + biases

    def _padded(self, tensor: torch.Tensor, fill: float) -> torch.Tensor:
        """A head's weight ``[C, H]`` or bias ``[C]`` padded to the widest head."""
        pad = (0, 0, 0, self.width - tensor.shape[0]) if tensor.dim() == 2 else (0, self.width - tensor.shape[0])
        return nn.functional.pad(tensor, pad, value=fill)

    def _stacked(self):
        """``([T, W, H] weights, [T, W] biases, [(weight, bias)] per head)``, built once and kept: each head's
        Parameters are views of their rows, so optimizer steps and checkpoint loads write into the stack."""
        if self._stacks is None:
            params = [(head.weight, head.bias) for head in self.heads]
            weights = stack_as_views([w for w, _ in params], fill=0.0)
            biases = stack_as_views([b for _, b in params], fill=float("-inf"))
            self._stacks = (weights, biases, params)
        return self._stacks

    def _check_stacks(self) -> None:
        """Drop the stack when a conversion or an assigning load replaced the heads' tensors (rebuilt when read)."""
        stacks = getattr(self, "_stacks", None)
        if stacks is not None:
            weights, biases, params = stacks
            current = [(head.weight, head.bias) for head in self.heads]
            if any(a is not c or b is not d for (a, b), (c, d) in zip(params, current)) or not (
                are_views_of([w for w, _ in current], weights) and are_views_of([b for _, b in current], biases)
            ):
                self._stacks = None

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._check_stacks()
        return out

    @staticmethod
    def _after_load(module: "TaskHeads", incompatible_keys) -> None:
        module._check_stacks()  # copy_ keeps the views; load_state_dict(assign=True) replaces the Parameters

    def __getstate__(self):
        # A copy (deepcopy, pickle) gets independent Parameters; it builds a stack of its own.
        state = dict(super().__getstate__())
        if "_stacks" in state:
            state["_stacks"] = None
        return state


class ContinualClassifier(MultiTaskModule):
    """Encoder + pooling + heads. ``forward(x, task_labels)`` with ``x: [B, 2, L]`` returns ``[B, C]`` logits.

    Args:
        backbone: a Hugging Face encoder (or a causal LM's base model).
        task_labels: the label strings of every task, in stream order.
        head: ``TaskHeads`` mode, "task" or "shared".
        pooling: "mean", "cls" or "last".
        heads: heads built elsewhere (they answer ``target_index``, ``activate``, ``parameters_for``, ``mode``),
            used instead of building ``TaskHeads``; a subclass that scores without pooled features passes its own.
    """

    def __init__(
        self,
        backbone: nn.Module,
        task_labels: Sequence[Sequence[str]],
        head: str = "task",
        pooling: str = "mean",
        heads: nn.Module | None = None,
    ):
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.heads = heads if heads is not None else TaskHeads(backbone.config.hidden_size, task_labels, head)
        # A continual.modules.ModuleBank set by a strategy that puts per-task modules in the backbone; when set,
        # every backbone call routes each sample to its task's modules.
        self.bank = None
        # Task inference (continual.modules.routers): when set, evaluation ignores the given task id for routing and
        # uses the task the router infers from the input; `route_inferred=False` evaluates with the given id (the
        # oracle) in the same run. `routing_log` collects (true task [B], routed task [B]) of routed evaluations.
        self.task_router = None
        self.router_layers: Sequence[int] = ()
        self.router_top_k, self.router_temperature = 1, 1.0  # soft mode when top_k > 1
        self.route_inferred = True
        self.routing_log: List[tuple] = []
        # `training.precision`: None runs in float32; torch.bfloat16 autocasts every forward (training, evaluation,
        # routing features, answers) while parameters, gradients and the returned scores stay float32.
        self.compute_dtype: Optional[torch.dtype] = None

    def precision(self, x: torch.Tensor):
        """The autocast context of ``compute_dtype`` on ``x``'s device (a no-op in float32)."""
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(x.device.type, dtype=self.compute_dtype)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        n_virtual: int = 0,
    ) -> torch.Tensor:
        """[B, L] ids and mask -> [B, H] sentence features.

        ``n_virtual`` leading positions (prompt/prefix tokens of a module bank, with their ``position_ids``) are
        run through the backbone but not pooled.
        """
        extra = {} if position_ids is None else {"position_ids": position_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if n_virtual:
            hidden, attention_mask = hidden[:, n_virtual:], attention_mask[:, n_virtual:]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        last = attention_mask.sum(1).long().clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor | Dict[int, torch.Tensor]:
        """x: [B, 2, L]; task_labels: [B] tensor, one int for the whole batch, or None for every task trained so
        far (Avalanche's convention, used by LwF), which returns ``{task: [B, C] logits}``. Float32 scores, whatever
        ``compute_dtype`` the forward ran in."""
        with self.precision(x):
            out = self._forward(x, task_labels)
        if isinstance(out, dict):
            return {task: logits.float() for task, logits in out.items()}
        return out.float()

    def _forward(self, x: torch.Tensor, task_labels) -> torch.Tensor | Dict[int, torch.Tensor]:
        """:meth:`forward` in the compute dtype (subclasses that score differently override this)."""
        if task_labels is None:
            tasks = sorted(self.known_train_tasks_labels)
            labels = {task: torch.full((x.shape[0],), task, dtype=torch.long, device=x.device) for task in tasks}
            if self.bank is not None:  # features differ per task: one backbone pass per task
                return {task: self.routed_logits(x, labels[task]) for task in tasks}
            features = self._features(x)
            return {task: self.heads(features, labels[task]) for task in tasks}
        if not torch.is_tensor(task_labels):
            task_labels = torch.full((x.shape[0],), int(task_labels), dtype=torch.long, device=x.device)
        if self.routes_by_inference():
            if self.router_top_k > 1:
                return self._soft_routed(x, task_labels)
            routed = self.infer_tasks(x)
            self.routing_log.append((task_labels.detach().cpu(), routed.detach().cpu()))
            return self.heads.in_gold_space(self.routed_logits(x, routed), routed, task_labels.to(routed.device))
        return self.routed_logits(x, task_labels)

    def routed_logits(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """``[B, 2, L]`` inputs answered by the tasks ``tasks: [B]`` (each sample by its task's modules and head) ->
        ``[B, W]`` logits in those tasks' label spaces (the given task for the oracle, the inferred one when routed)."""
        return self.heads(self._features(x, tasks), tasks)

    def _soft_routed(self, x: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Soft mode: the top-k tasks' modules act together with the router's weights (one forward through the
        bank), and each of those tasks' heads answers from the mixed features; their probabilities, mapped into the
        gold label space, are mixed with the same weights. Logged route: the top task."""
        from continual.modules.routers import mixing_weights

        scores, candidates = self.task_scores(x)  # [B, K], [K]
        weights = mixing_weights(scores, self.router_top_k, self.router_temperature)  # [B, K]
        top = candidates[weights.argmax(1)]
        self.routing_log.append((gold.detach().cpu(), top.detach().cpu()))
        n_slots = int(candidates.max()) + 1
        slot_weights = torch.zeros(x.shape[0], n_slots, device=x.device).index_copy(1, candidates, weights.float())
        features = self._features(x, top, slot_weights)
        gold = gold.to(x.device)
        probs = 0.0
        for k in range(min(self.router_top_k, len(candidates))):
            chosen = weights.topk(k + 1, dim=1).indices[:, k]  # each sample's k-th task (index into candidates)
            task = candidates[chosen]
            mapped = self.heads.in_gold_space(self.heads(features, task), task, gold).exp()
            probs = probs + weights.gather(1, chosen[:, None]) * mapped
        return probs.clamp_min(1e-12).log()

    # ------------------------------------------------------------------ task inference
    def routes_by_inference(self) -> bool:
        """Whether this forward infers each sample's task: a router with fitted tasks, evaluation, routing on."""
        router = self.task_router
        return router is not None and self.route_inferred and not self.training and bool(router.tasks)

    def routing_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2, L]`` -> ``[B, F]``: the frozen backbone's mean-pooled hidden states of ``router_layers``
        (concatenated), with no task module acting (the bank bypassed)."""
        input_ids, attention_mask = x[:, 0], x[:, 1]
        used = max(int(attention_mask.sum(1).max().item()) if attention_mask.numel() else 0, 1)
        ids, mask = input_ids[:, :used], attention_mask[:, :used]
        trunk = self.hidden_model()
        with self.precision(x):
            if self.bank is None:
                hidden = trunk(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            else:  # every site acts as its base module: the bare backbone, at its own cost (no virtual tokens)
                with self.bank.route(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device), bypass=True):
                    hidden = trunk(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        mask = mask.float().unsqueeze(-1)  # pooled in float32 whatever the compute dtype (the statistics are wider)
        layers = list(self.router_layers) or [len(hidden) - 1]
        pooled = [(hidden[i].float() * mask).sum(1) / mask.sum(1).clamp_min(1.0) for i in layers]
        return torch.cat(pooled, -1)

    def hidden_model(self) -> nn.Module:
        """The module whose forward returns the hidden states routers read (the backbone itself here)."""
        return self.backbone

    def infer_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2, L]`` -> ``[B]`` the task each sample is routed to, among the tasks the router has fitted.

        Feature routers score tasks from :meth:`routing_features`; a router that reads the candidates' predictions
        (``reads_candidates``, e.g. ``entropy``) gets every candidate task's logits, computed in one batched
        forward of ``B x K`` samples through the bank (each copy routed to one candidate).
        """
        scores, ids = self.task_scores(x)
        return ids[scores.argmax(1)]

    def task_scores(self, x: torch.Tensor) -> tuple:
        """``([B, K] scores, [K] task ids)`` over the tasks the router has fitted (higher is more likely)."""
        router = self.task_router
        ids = torch.tensor(sorted(router.tasks), dtype=torch.long, device=x.device)
        if getattr(router, "reads_candidates", False):
            k, b = len(ids), x.shape[0]
            each = ids.repeat_interleave(b)  # [K*B]: copy c of the batch routed to candidate c
            logits = self.routed_logits(x.repeat(k, 1, 1), each).view(k, b, -1)
            return router.scores_from_logits(logits), ids  # [B, K]
        return router.scores(self.routing_features(x)), ids

    def _features(self, x: torch.Tensor, task_labels: torch.Tensor | None = None,
                  slot_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Drop the padding columns no sample uses, then encode: [B, 2, L] -> [B, H].

        ``task_labels: [B]`` routes each sample to its task's modules when a bank is attached (required then);
        ``slot_weights: [B, K]`` replaces the composition's weights (the soft route).
        """
        input_ids, attention_mask = x[:, 0], x[:, 1]
        longest = attention_mask.sum(1).max() if attention_mask.numel() else attention_mask.new_zeros(())
        if self.bank is None:
            used = max(int(longest), 1)
            return self.encode(input_ids[:, :used], attention_mask[:, :used])
        if task_labels is None:
            raise ValueError("this model has per-task modules: its features need the samples' task labels")
        with self.bank.route(task_labels, weights=slot_weights):
            used = max(int(self.bank.host_value(longest)), 1)  # one device sync with the bank's slot selection
            ids, mask, positions, n_virtual = self.bank.prepare_inputs(input_ids[:, :used], attention_mask[:, :used])
            if n_virtual and not self._takes_position_ids():
                positions = None  # e.g. T5: relative positions; the virtual tokens shift nothing absolute
            return self.encode(ids, mask, positions, n_virtual)

    def _takes_position_ids(self) -> bool:
        backbone_type = type(self.backbone)
        if getattr(self, "_position_ids_for", (None,))[0] is not backbone_type:  # inspect once per backbone class
            import inspect

            self._position_ids_for = (backbone_type, "position_ids" in inspect.signature(self.backbone.forward).parameters)
        return self._position_ids_for[1]

    @torch.no_grad()
    def answer(self, x: torch.Tensor, tasks: torch.Tensor | None = None) -> tuple:
        """What the model answers for inputs, in label strings' terms (``continual predict``).

        Args:
            x: ``[B, 2, L]`` token ids stacked on the attention mask.
            tasks: ``[B]`` the task of each input when known; None lets the router decide (a shared head needs
                neither: it answers over every label seen so far).

        Returns:
            ``(probabilities [B, W], answering task [B])``: probabilities over the labels of each sample's answering
            task (:meth:`label_of` names them; -1 as the task means the shared head's labels).

        Raises:
            ValueError: no task given and nothing to infer it with (a per-task head and no router).
        """
        with self.precision(x):
            return self._answer(x, tasks)

    def _answer(self, x: torch.Tensor, tasks: torch.Tensor | None) -> tuple:
        shared = getattr(self.heads, "mode", "task") == "shared"
        if tasks is None and shared:
            tasks = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return torch.softmax(self.routed_logits(x, tasks).float(), -1), torch.full_like(tasks, -1)
        if tasks is None:
            if self.task_router is None or not self.task_router.tasks:
                raise ValueError("this model routes by the task id (no task-inferring router): give the task")
            if self.router_top_k > 1:  # soft route: the top task's labels, mixed with the others' by label string
                scores, candidates = self.task_scores(x)
                top = candidates[scores.argmax(1)]
                log_probs = self._soft_routed(x, top)
                self.routing_log.pop()  # not an evaluation: nothing to count
                return log_probs[:, :-1].exp(), top
            tasks = self.infer_tasks(x)
        tasks = tasks.to(x.device).long()
        logits = self.routed_logits(x, tasks).float()
        if shared:  # the given task's labels only
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            for task in tasks.unique().tolist():
                rows = tasks == task
                allowed[rows.nonzero(as_tuple=True)[0][:, None], torch.tensor(self.heads.target_index(task), device=x.device)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
            return torch.softmax(logits, -1), torch.full_like(tasks, -1)
        return torch.softmax(logits, -1), tasks

    def label_of(self, task: int, index: int) -> str:
        """The label string of output ``index`` of task ``task``'s answers (-1: the shared head's labels)."""
        if task < 0:
            return self.heads.shared_labels[index]
        return self.heads.task_labels[task][index]

    # Avalanche's MultiTaskModule routes single-task calls through here (LwF's forward_all_tasks, for one).
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.forward(x, task_label)
