"""docs/config.md, generated from the config schema (coopt_ray/config.py, coopt_ray/config_distill.py).

    python docs/config_doc.py            # print the Markdown
    python docs/config_doc.py --write    # rewrite docs/config.md
    python docs/config_doc.py --check    # exit 1 when docs/config.md differs from the schema (tests/test_docs.py)

Every key is a field of a frozen dataclass; its meaning is the comment on the field's line (and the comment lines
indented under it), a section's intro is its class docstring, and a comment line at the fields' own indent starts
a group. A field without a comment is an error: every key must say what it means.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coopt_ray import config as C  # noqa: E402

PAGE = ROOT / "docs" / "config.md"
LISTS = {"participants": C.ParticipantConfig}  # Config fields that hold a list of sections
TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "dict": "mapping", "tuple": "list"}


def field_notes(cls, keys) -> dict[str, tuple[str, str]]:
    """``{field: (meaning, group heading or "")}`` read from the comments in ``cls``'s source; every field named in
    ``keys`` must have one."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                 for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    notes, group, last, indent = {}, "", None, None
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if name in names and ":" in stripped and not stripped.startswith("#"):
            indent = len(line) - len(line.lstrip())
            col, text = comments.get(no, (None, ""))
            notes[name], last = [text, group], name
            group = ""
        elif stripped.startswith("#") and last is not None:
            col, text = comments[no]
            if col > indent:  # a continuation of the field above
                notes[last][0] = f"{notes[last][0]} {text}".strip()
            else:  # a heading for the fields below
                group, last = text.strip("- ").strip(), None
        elif stripped.startswith("def "):
            break
    missing = sorted(set(keys) - {n for n, (m, _) in notes.items() if m})
    if missing:
        raise SystemExit(f"{cls.__module__}.{cls.__name__}: no comment says what {', '.join(missing)} mean(s)")
    return {n: tuple(v) for n, v in notes.items()}


def type_name(ann: str) -> str:
    """A field annotation in words: ``Optional[int]`` -> ``integer or null``."""
    if ann.startswith("Optional[") and ann.endswith("]"):
        return f"{type_name(ann[len('Optional['):-1])} or null"
    if " | " in ann:  # ``bool | str`` -> ``boolean or string``
        return " or ".join(type_name(a) for a in ann.split(" | "))
    return TYPES.get(ann, ann)


def yaml_value(v) -> str:
    """A default as it is written in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"' if v == "" else v
    if isinstance(v, tuple):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, float) and "e" in repr(v):  # 1e-05 -> 1.0e-5, which YAML reads as a number
        m, e = repr(v).split("e")
        return f"{m if '.' in m else m + '.0'}e{int(e)}"
    return str(v)


def cell_text(s: str) -> str:
    """Comment text as a Markdown table cell: code spans, and |, <, > that GitHub would otherwise take."""
    return s.replace("``", "`").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def section(cls, key: str, only=None) -> list[str]:
    """One table: every field of ``cls`` (or those named in ``only``) under ``key`` (a dotted prefix)."""
    intro = cell_text((inspect.getdoc(cls) or "").replace("\n", " ")).replace("\\|", "|")
    out = [intro, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    fields = [f for f in dataclasses.fields(cls) if only is None or f.name in only]
    notes = field_notes(cls, [f.name for f in fields])
    for f in fields:
        meaning, group = notes[f.name]
        if group:
            out.append(f"| **{group}** | | | |")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        required = cls is C.ParticipantConfig and f.name in ("name", "model")
        cell = "(required)" if required else f"`{yaml_value(default)}`"
        out.append(f"| `{key}{f.name}` | {type_name(str(f.type))} | {cell} | {cell_text(meaning)} |")
    return out


def render() -> str:
    """The whole page."""
    out = ["# Config reference", "",
           ("[README](../README.md) · [design](design.md) · [config](config.md) · [cluster](cluster.md) · "
            "[failures](failures.md) · [results](results.md)"), "",
           ("<!-- generated by `python docs/config_doc.py --write` from coopt_ray/config.py and "
            "coopt_ray/config_distill.py; tests/test_docs.py fails when this page and the code differ -->"), "",
           "A config is one YAML file (`configs/` has ready ones, each validated by `tests/test_config.py`). Every key",
           "below is optional unless marked required; `participants` must list at least one participant. An unknown",
           "key, a value of the wrong type or out of range is an error that names the key, exit code 2, before Ray",
           "starts (`coopt: config error: 'participants[0].num_gpus' must be a number, got 'x'`).", ""]
    top = [f for f in dataclasses.fields(C.Config)]
    scalars = [f for f in top if f.default is not dataclasses.MISSING and f.name not in LISTS]
    out += ["## Top level", ""]
    out += section(C.Config, "", only={f.name for f in scalars})
    for f in top:
        if f.name in LISTS:
            out += ["", f"## {f.name}", "", f"`{f.name}:` is a list; each entry has these keys "
                    f"([participants.md](participants.md) explains the model specs).", ""]
            out += section(LISTS[f.name], f"{f.name}[*].")
        elif f.default is dataclasses.MISSING:
            cls = type(f.default_factory())
            out += ["", f"## {f.name}", ""] + section(cls, f"{f.name}.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/config.md differs from the config schema; run `python docs/config_doc.py --write`",
                  file=sys.stderr)
            return 1
        return 0
    if a.write:
        PAGE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
