"""``--help`` at 80 columns: options grouped in their panels (``rich_help_panel``), choices as the
metavar, the help text in a column at least half the width.

Typer's own rich help leaves the help text a third of an 80-column terminal for commands with
long metavars; this renders the same panels with rich, and a spec too wide for its column gets a
line of its own.
"""

from __future__ import annotations

import inspect as _inspect
import io
import shutil
import sys

from rich.console import Console, Group as RichGroup
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

HELP_MAX_WIDTH = 100  # help on a wide terminal stays readable
SPEC_MAX = 28  # widest "--option METAVAR" beside its help; a longer one gets a line of its own


def _paragraphs(text: str | None) -> list[str]:
    if not text:
        return []
    return [" ".join(p.split()) for p in _inspect.cleandoc(text).split("\n\n") if p.strip()]


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False))


def _spec(param) -> Text:
    """``--model, -m MODEL``; ``--stats / --no-stats``; ``STORE`` for an argument."""
    if getattr(param, "param_type_name", "") == "argument":
        return Text(param.metavar or param.name.upper(), style="bold yellow")
    text = Text()
    names = [*param.opts]
    if _is_flag(param) and param.secondary_opts and param.default is True:
        names += param.secondary_opts  # on by default: its --no- form is the one that does something
    for i, name in enumerate(names):
        if i:
            text.append(" / " if name.startswith("--no-") else ", ")
        text.append(name, style="bold cyan")
    if not _is_flag(param):
        text.append(" ")
        text.append(param.metavar or param.name.upper(), style="yellow")
    return text


def _default(param) -> str | None:
    show = getattr(param, "show_default", False)
    if isinstance(show, str):
        return show
    value = param.default
    if not show or param.required or value is None or value is False or value == "" or callable(value):
        return None
    if _is_flag(param):
        return param.opts[0] if value is True else None
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def _param_help(param) -> Text:
    text = Text(" ".join((param.help or "").split()), overflow="fold")
    default = _default(param)
    if default is not None:
        text.append(f" [default: {default}]", style="dim")
    if param.required:
        text.append(" [required]", style="dim red")
    return text


def _rows(items: list[tuple[Text, Text]], width: int) -> RichGroup:
    """Two columns, the first ``width`` wide; a first cell too wide for it goes on a line of its own."""
    parts = []
    for spec, text in items:
        grid = Table.grid(padding=(0, 2, 0, 0))
        grid.add_column(width=width, no_wrap=True)
        grid.add_column(ratio=1)
        if spec.cell_len > width:
            parts.append(spec)
            grid.add_row("", text)
        else:
            grid.add_row(spec, text)
        parts.append(grid)
    return RichGroup(*parts)


def help_text(command, ctx) -> str:
    """The help of ``command``: usage, description, its options in their panels
    (``rich_help_panel``), a command list for the group, then the epilog; at most 100 columns."""
    width = ctx.terminal_width or min(shutil.get_terminal_size().columns, HELP_MAX_WIDTH)
    out = Console(file=io.StringIO(), width=width, force_terminal=sys.stdout.isatty() or None,
                  highlight=False, emoji=False, markup=False)
    out.print(Padding(Text(command.get_usage(ctx)), (1, 1, 0, 1)))
    for paragraph in _paragraphs(command.help):
        out.print(Padding(Text(paragraph), (1, 1, 0, 1)))
    out.print()
    panels: dict[str, list] = {}
    last = "Options"  # --help joins the panel of the option before it
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if getattr(param, "param_type_name", "") == "argument":
            panel = "Arguments"
        elif param.name == "help":
            panel = last
        else:
            panel = last = getattr(param, "rich_help_panel", None) or "Options"
        panels.setdefault(panel, []).append(param)
    specs = {id(p): _spec(p) for params in panels.values() for p in params}
    commands = []
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                commands.append((Text(name, style="bold cyan"), Text((_paragraphs(sub.help) or [""])[0])))
    fitting = [s.cell_len for s in specs.values() if s.cell_len <= SPEC_MAX] + [c.cell_len for c, _ in commands]
    column = max(fitting, default=10)
    for title, params in panels.items():
        rows = [(specs[id(p)], _param_help(p)) for p in params]
        out.print(Panel(_rows(rows, column), title=title, title_align="left", border_style="dim"))
    if commands:
        out.print(Panel(_rows(commands, column), title="Commands", title_align="left",
                        border_style="dim"))
    for paragraph in _paragraphs(command.epilog):
        out.print(Padding(Text(paragraph), (1, 1, 0, 1)))
    return "\n".join(line.rstrip() for line in out.file.getvalue().rstrip().splitlines())
