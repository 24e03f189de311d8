"""Parameter groups for per-layer sensitivity: embeddings, each block, the head.

The per-layer noise probe perturbs one group at a time, so users see *where* the
model becomes fragile. Groups are inferred for the usual transformer layouts
(a ``ModuleList`` of blocks such as ``transformer.h.0`` or ``model.layers.0``)
and can be given for any module: a mapping ``{group: [name prefixes]}`` or a
callable ``name -> group`` (None leaves a parameter out).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

LayerGroups = Mapping[str, Sequence[str]] | Callable[[str], str | None]

EMBEDDINGS = "embeddings"
HEAD = "head"

# The first `<name>.<index>.` in a parameter name: a block of a ModuleList/Sequential.
_BLOCK = re.compile(r"(?:^|\.)([A-Za-z_]\w*\.\d+)\.")


def infer_layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names into ``embeddings``, one group per block, and ``head``.

    A block is the first ``<container>.<index>`` in a name (``transformer.h.3``,
    ``model.layers.3``). Parameters before the first block form ``embeddings``;
    those after the last block and in no block (final norm, untied head) form
    ``head``. Group names drop the path all blocks share, so GPT-2 inside a
    LightningModule gives ``embeddings, h.0, h.1, ..., head``.

    Args:
        names: parameter names in ``named_parameters()`` order.

    Returns:
        ``{group: [parameter names]}`` in model order; empty groups are left out.

    Raises:
        ValueError: if no name contains a block index; pass ``layer_groups`` then.

    Example::

        >>> infer_layer_groups(["wte.weight", "h.0.w", "h.1.w", "ln_f.weight"])
        {'embeddings': ['wte.weight'], 'h.0': ['h.0.w'], 'h.1': ['h.1.w'], 'head': ['ln_f.weight']}
    """
    blocks = [_block_of(name) for name in names]
    found = [b for b in blocks if b is not None]
    if not found:
        raise ValueError(
            f"Cannot infer layer groups: no parameter name holds a block index like"
            f" `h.0.` or `layers.0.` (names start {list(names[:3])}). Pass `per_layer` as a"
            " mapping {group: [name prefixes]} or a callable name -> group."
        )
    shared = _shared_path(found)
    groups: dict[str, list[str]] = {}
    seen_block = False
    for name, block in zip(names, blocks):
        if block is not None:
            seen_block = True
            group = block[len(shared) :]
        else:
            group = HEAD if seen_block else EMBEDDINGS
        groups.setdefault(group, []).append(name)
    if EMBEDDINGS in groups:
        groups = {EMBEDDINGS: groups.pop(EMBEDDINGS), **groups}
    if HEAD in groups:
        groups[HEAD] = groups.pop(HEAD)
    return groups


def group_parameters(
    names: Sequence[str], layer_groups: LayerGroups | None = None
) -> dict[str, list[int]]:
    """Indices into ``names`` of each group's parameters, in display order.

    Args:
        names: parameter names in ``named_parameters()`` order.
        layer_groups: None to infer (:func:`infer_layer_groups`); a mapping
            ``{group: [name prefixes]}`` (a parameter joins the first group with a
            matching prefix, ``""`` matches all); or a callable ``name -> group or None``.
            Parameters in no group are not perturbed per layer.

    Raises:
        ValueError: on a group that matches no parameter, a bad group name, or a
            spec of the wrong type.
    """
    if layer_groups is None:
        named = infer_layer_groups(names)
    elif isinstance(layer_groups, Mapping):
        named = _groups_from_prefixes(names, layer_groups)
    elif callable(layer_groups):
        named = {}
        for name in names:
            group = layer_groups(name)
            if group is not None:
                named.setdefault(_checked_group(group), []).append(name)
        if not named:
            raise ValueError(
                "`per_layer` put no parameter in any group: the callable returned None for"
                f" every name (e.g. {list(names[:3])}). Return a group name such as 'h.0'."
            )
    else:
        raise ValueError(
            f"`per_layer` must be True, a mapping {{group: [name prefixes]}} or a callable"
            f" name -> group, got {type(layer_groups).__name__}."
        )
    index = {name: i for i, name in enumerate(names)}
    return {group: [index[n] for n in members] for group, members in named.items()}


def _groups_from_prefixes(
    names: Sequence[str], spec: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    prefixes = {}
    for group, value in spec.items():
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
            raise ValueError(
                f"`per_layer[{group!r}]` must be a list of parameter-name prefixes, got"
                f" {value!r}. E.g. {{'embeddings': ['model.transformer.wte']}}."
            )
        prefixes[_checked_group(group)] = list(value)
    groups: dict[str, list[str]] = {group: [] for group in prefixes}
    for name in names:
        for group, options in prefixes.items():
            if any(_has_prefix(name, p) for p in options):
                groups[group].append(name)
                break
    empty = [g for g, members in groups.items() if not members]
    if empty:
        raise ValueError(
            f"`per_layer` group(s) {empty} match no parameter. Prefixes are matched at dots"
            f" against `named_parameters()` names, which start {list(names[:3])}."
        )
    return groups


def _has_prefix(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _checked_group(group: object) -> str:
    if not isinstance(group, str) or not group or "/" in group or any(c.isspace() for c in group):
        raise ValueError(
            f"A layer group name must be a non-empty string without '/' or spaces (it becomes"
            f" part of a metric key), got {group!r}."
        )
    return group


def _block_of(name: str) -> str | None:
    match = _BLOCK.search("." + name)
    if match is None:
        return None
    # The full path up to the block index, so two stacks (encoder/decoder) stay apart.
    return ("." + name)[1 : match.end(1)]


def _shared_path(blocks: Sequence[str]) -> str:
    parts = [b.split(".") for b in blocks]
    shared: list[str] = []
    for column in zip(*(p[:-2] for p in parts)):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return "".join(part + "." for part in shared)
