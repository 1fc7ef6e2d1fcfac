"""Label words: how a causal LM names a task's classes (the verbaliser of few-shot classification as in TinT's
evaluation, Panigrahi et al. 2023, arXiv 2307.01189, §4).

Class ``c`` of a task is scored by the log-probability of one token, the first token of ``" " + word`` where
``word`` is the label string itself unless the config overrides it per task. Two classes whose first tokens collide
could never be told apart, so that is an error naming the labels, the token and the config key to set.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence


class LabelWordError(ValueError):
    """A task's label words are unusable (unknown label in the override, empty word, colliding first tokens)."""


def label_word_ids(
    tokenizer,
    labels: Sequence[str],
    words: Optional[Mapping[str, str]] = None,
    task: str = "",
) -> List[int]:
    """The token id that scores each label.

    Args:
        tokenizer: a Hugging Face tokenizer.
        labels: the task's label strings, in label-index order.
        words: optional ``{label: word}`` overrides (labels not named keep their own string).
        task: the task's name, for error messages and the config key they suggest.

    Returns:
        One token id per label: the first token of ``" " + word``.

    Raises:
        LabelWordError: an override names a label the task does not have, a word yields no token, or two labels
            start with the same token.
    """
    words = dict(words or {})
    unknown = sorted(set(words) - set(labels))
    if unknown:
        raise LabelWordError(
            f"strategy.label_words.{task}: {unknown} are not labels of task {task!r} (its labels: {list(labels)})"
        )
    ids: List[int] = []
    for label in labels:
        word = str(words.get(label, label))
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not tokens or not word.strip():
            raise LabelWordError(f"task {task!r}: the label word {word!r} of label {label!r} gives no token")
        ids.append(int(tokens[0]))
    first: Dict[int, str] = {}
    for label, token in zip(labels, ids):
        if token in first:
            piece = tokenizer.convert_ids_to_tokens(token)
            raise LabelWordError(
                f"task {task!r}: labels {first[token]!r} and {label!r} both start with the token {piece!r} "
                f"(id {token}), so they cannot be told apart; give them distinct label words with "
                f"strategy.label_words.{task or '<task>'}={{{first[token]!r}: ..., {label!r}: ...}}"
            )
        first[token] = label
    return ids
