"""What each config key means, read from the comments beside its field: one source for
`--help`, the generated defaults files (configs/defaults/*.yaml) and the configuration
reference (configs/REFERENCE.md).

A field's description is the comment block right above it plus the comment at the end of its
line. A field with neither, inside a group of fields written without blank lines between them,
takes the block above the group's first field (e.g. "Ray: CPUs per shard task, ..."), unless a
field between them has a comment of its own. A field
whose metadata says `hidden` (test knobs such as `fault_at_step`) is left out of help and
reference, though it stays a valid key.

    @dataclasses.dataclass(frozen=True)
    class Example:
        # Source frames between a clip's frames.
        frame_step: int = 1
        max_in_flight: int = 0  # tasks at once; 0 = 2 x cluster CPUs
        fault_at_step: int = dataclasses.field(default=-1, metadata={"hidden": True})
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from collections.abc import Iterator
from typing import Any

HIDDEN = "hidden"  # a field's metadata key: not shown in help or the reference


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as help and the reference show it."""

    key: str  # dotted, e.g. "loader.batch_size"
    default: Any
    description: str  # "" when the field has no comment


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: description} from the class source ({} when the source is unavailable)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    own_line: set[int] = set()  # lines holding nothing but a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                own_line.add(tok.start[0])
    docs: dict[str, str] = {}
    group_block, previous_end = "", -1
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = -1  # a method or docstring ends a group
            continue
        above, line = [], node.lineno - 1
        while line in own_line:
            above.insert(0, comments[line])
            line -= 1
        trailing = [c for n, c in sorted(comments.items())
                    if node.lineno <= n <= node.end_lineno and n not in own_line][:1]  # fmt: skip
        # In a group: the previous field ends on the line right above (no blank line).
        in_group = previous_end == line
        if above or trailing or not in_group:  # a field with its own comment ends a group
            group_block = " ".join(above)
        own = " ".join([*above, *trailing])
        docs[node.target.id] = own or (group_block if in_group else "")
        previous_end = node.end_lineno
    return docs


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def key_docs(cls: type, prefix: str = "") -> Iterator[KeyDoc]:
    """Every visible leaf key of a config class, in definition order, nested sections
    flattened with dotted names."""
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get(HIDDEN):
            continue
        default = default_of(field)
        if dataclasses.is_dataclass(default):
            yield from key_docs(type(default), f"{prefix}{field.name}.")
        else:
            yield KeyDoc(f"{prefix}{field.name}", default, docs.get(field.name, ""))


def section_docs(cls: type) -> dict[str, str]:
    """{section name: its class docstring's first paragraph} for nested config sections."""
    out = {}
    for field in dataclasses.fields(cls):
        default = default_of(field)
        if dataclasses.is_dataclass(default):
            doc = inspect.getdoc(type(default)) or ""
            out[field.name] = " ".join(doc.split("\n\n")[0].split())
    return out


def hidden_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the fields left out of help (still valid keys)."""
    out = set()
    for field in dataclasses.fields(cls):
        default = default_of(field)
        if field.metadata.get(HIDDEN):
            out.add(f"{prefix}{field.name}")
        elif dataclasses.is_dataclass(default):
            out |= hidden_keys(type(default), f"{prefix}{field.name}.")
    return out
