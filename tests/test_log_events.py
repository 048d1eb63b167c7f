"""Every log line of the service is an event: ``event=<snake_case_name> key=value ...``.

The front (``pacsys/``) and the worker runtime (``workers/``) are read with `ast`, and every
call of a logger's method is held to the rule (docs/design.md, "Logs"):

- its message template is a string literal (or a local name bound only to literals, which may
  be extended with more literal pairs, or the parameter of a logging helper to which every
  call in its module passes a literal), never built from values: a value is a %-argument, so
  that the formatter escapes it;
- it starts with ``event=`` and a snake_case name, and the rest is ``key=value`` pairs only,
  each value a %-placeholder (``%s``, ``%.2fs``), a bare word of the program's own
  (``reason=last_worker``) or a quoted sentence without a placeholder (``hint="..."``);
  prose goes into such a field, never loose after the pairs;
- no pair is named like a field the formatter writes itself (``msg``, ``ts``, ...: in JSON
  the formatter's field would win and the pair would be lost), and, in code that runs in a
  worker process, not like the worker's fixed fields (``worker``, ``pid``);
- as many placeholders as %-arguments.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from processes import REPO

SOURCES = ("pacsys", "workers")
LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})
# Fields of every line (workers.logformat), and the fixed fields of a worker process's lines.
RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "event"})
RESERVED_IN_WORKERS = frozenset({"worker", "pid"})
RUNS_IN_WORKERS = ("workers/", "pacsys/backends/")  # the runtime, and the backends it builds

# Calls whose template the walk cannot read, each with the reason it is right as it is.
EXCEPTIONS = {
    ("pacsys/supervised/stderr_relay.py", "_record"): (
        "the relay's records of lines written to fd 2: `event=%s` with one of the two names the relay "
        "itself passes (grpc_core, stderr); tests/test_grpc_core_lines.py checks the lines"
    ),
}

_EVENT = re.compile(r"event=([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?= |$)")
_PAIR = re.compile(r' ([a-z][a-z0-9_]*)=("[^"%\\]*"|[^\s"=\\]+)')
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")


@dataclass
class LogCall:
    path: str
    line: int
    function: str
    call: ast.Call
    template: ast.expr | None
    module: ast.Module

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.function})"


def _logger_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to ``logging.getLogger(...)``."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and _is_get_logger(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_get_logger(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger"


def _logger_parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The parameters of `function` annotated as a logging.Logger."""
    args = function.args
    return {
        a.arg
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]
        if a.annotation is not None and ast.unparse(a.annotation) in ("logging.Logger", "Logger")
    }


def _is_logger(receiver: ast.expr, loggers: set[str]) -> bool:
    if isinstance(receiver, ast.Name):
        return receiver.id in loggers or receiver.id == "logging"  # logging.info(...): the root logger
    return _is_get_logger(receiver)


def log_calls() -> Iterator[LogCall]:
    for source in SOURCES:
        for file in sorted((REPO / source).rglob("*.py")):
            path = file.relative_to(REPO).as_posix()
            if path.startswith("pacsys/_proto/"):
                continue
            yield from calls_in(ast.parse(file.read_text(), path), path)


def calls_in(tree: ast.Module, path: str) -> Iterator[LogCall]:
    yield from _walk(tree, tree, path, "<module>", _logger_names(tree))


def _walk(module: ast.Module, node: ast.AST, path: str, function: str, loggers: set[str]) -> Iterator[LogCall]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _walk(module, child, path, child.name, loggers | _logger_parameters(child))
            continue
        if (
            isinstance(child, ast.Call)
            and isinstance(child.func, ast.Attribute)
            and child.func.attr in LOG_METHODS
            and _is_logger(child.func.value, loggers)
        ):
            args = child.args[1:] if child.func.attr == "log" else child.args
            yield LogCall(path, child.lineno, function, child, args[0] if args else None, module)
        yield from _walk(module, child, path, function, loggers)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _function_of(call: LogCall) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function around `call`."""
    (function,) = [
        f for f in _functions(call.module) if f.name == call.function and f.lineno <= call.line <= f.end_lineno
    ]
    return function


def _bindings(function: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> list[ast.expr]:
    """What `name` is bound to in `function` (tuple assignments unpacked)."""
    values = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == name:
                values.append(node.value)
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                for element, value in zip(target.elts, node.value.elts, strict=True):
                    if isinstance(element, ast.Name) and element.id == name:
                        values.append(value)
    return values


def _passed_to(tree: ast.Module, function: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> list[ast.expr] | None:
    """When `name` is a parameter of `function` (a helper that logs the template it is given):
    what the calls of `function` in its module pass for it. None when it is no parameter."""
    params = [a.arg for a in [*function.args.posonlyargs, *function.args.args]]
    if name not in params:
        return None
    index = params.index(name) - (1 if params[0] in ("self", "cls") else 0)
    passed = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if callee != function.name:
            continue
        given = [k.value for k in node.keywords if k.arg == name]
        passed += given or node.args[index : index + 1]
    return passed


def templates(call: LogCall) -> tuple[list[str], list[str]]:
    """The templates `call` can log (whole ones, and literal pairs added to them), or problems."""
    node = call.template
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value], []
    if not isinstance(node, ast.Name):
        shown = ast.unparse(node) if node is not None else "nothing"
        return [], [f"the template is {shown}, not a string literal: values go in as %-arguments"]
    function = _function_of(call)
    whole, problems = [], []
    passed = _passed_to(call.module, function, node.id)
    for value in [*(passed or []), *_bindings(function, node.id)]:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            whole.append(value.value)
        elif (
            isinstance(value, ast.BinOp)
            and isinstance(value.op, ast.Add)
            and isinstance(value.left, ast.Name)
            and value.left.id == node.id
            and isinstance(value.right, ast.Constant)
            and isinstance(value.right.value, str)
        ):
            problems += [f"{p} (in the pairs added: {value.right.value!r})" for p in pair_problems(value.right.value)]
        else:
            problems.append(f"{node.id} is bound to {ast.unparse(value)}, not a string literal")
    if not whole and not problems:
        problems.append(f"{node.id} is bound to no string literal in {call.function}")
    return whole, problems


def pair_problems(text: str, reserved: frozenset[str] = RESERVED, seen: set[str] | None = None) -> list[str]:
    """What is wrong with `text` as ``( key=value)*``."""
    seen = set() if seen is None else seen
    problems, pos = [], 0
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if match is None:
            problems.append(f"not a key=value pair at {text[pos:]!r}")
            break
        key = match.group(1)
        if key in reserved:
            problems.append(f"{key}= is a field of the line itself")
        if key in seen:
            problems.append(f"{key}= twice")
        seen.add(key)
        pos = match.end()
    return problems


def template_problems(template: str, reserved: frozenset[str] = RESERVED) -> list[str]:
    """What is wrong with `template` as ``event=<snake_case> key=value ...``."""
    event = _EVENT.match(template)
    if event is None:
        return [f"{template!r} does not start with event=<snake_case_name>"]
    return pair_problems(template[event.end() :], reserved)


def _reserved(call: LogCall) -> frozenset[str]:
    return RESERVED | RESERVED_IN_WORKERS if call.path.startswith(RUNS_IN_WORKERS) else RESERVED


CALLS = list(log_calls())


def test_the_walk_finds_the_services_log_calls():
    """A walk that found nothing would hold nothing: it sees the calls of each kind."""
    assert len(CALLS) > 80, len(CALLS)
    kinds = {(c.path, c.call.func.attr) for c in CALLS}
    for expected in [
        ("pacsys/pool/pool.py", "warning"),  # logger = logging.getLogger(...)
        ("pacsys/supervised/gate.py", "log"),  # logger.log(level, text, ...)
        ("pacsys/supervised/stderr_relay.py", "log"),  # a logging.Logger parameter
        ("workers/worker.py", "exception"),
        ("pacsys/supervised/reporting.py", "critical"),  # the excepthook's
    ]:
        assert expected in kinds, expected


@pytest.mark.parametrize("call", [c for c in CALLS if (c.path, c.function) not in EXCEPTIONS], ids=str)
def test_every_log_line_is_an_event_with_fields(call):
    whole, problems = templates(call)
    for template in whole:
        problems += template_problems(template, _reserved(call))
    node = call.template
    if isinstance(node, ast.Constant) and not any(isinstance(a, ast.Starred) for a in call.call.args):
        placeholders = len(_PLACEHOLDER.findall(node.value.replace("%%", "")))
        arguments = len(call.call.args) - (2 if call.call.func.attr == "log" else 1)
        if placeholders != arguments:
            problems.append(f"{placeholders} placeholders for {arguments} arguments")
    assert not problems, f"{call}: {problems}"


def test_the_exceptions_are_still_there():
    """An exception whose call has gone (or now follows the rule) is taken off the list."""
    for (path, function), reason in EXCEPTIONS.items():
        calls = [c for c in CALLS if (c.path, c.function) == (path, function)]
        assert calls, f"{path} {function}: no log call left ({reason})"
        assert any(templates(c)[1] or any(template_problems(t) for t in templates(c)[0]) for c in calls), (
            f"{path} {function} follows the rule now: take it off EXCEPTIONS"
        )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("server stopped", "does not start with event="),
        ("serving DAQ on %s:%d", "does not start with event="),
        ("event=ServerStopped", "does not start with event="),
        ("event=audit_unavailable writes are refused", "not a key=value pair"),
        ("event=config_reload_failed error=%s, keeping the configuration", "not a key=value pair"),
        ("event=x msg=%s", "msg= is a field of the line itself"),
        ("event=x slot=%d slot=%d", "slot= twice"),
        ('event=x detail="a %s b"', "not a key=value pair"),
    ],
)
def test_the_rule_refuses_prose(template, problem):
    problems = template_problems(template)
    assert any(problem in p for p in problems), problems


def test_the_rule_takes_fields_units_and_sentences():
    for template in [
        "event=server_stopped",
        "event=worker_lost slot=%d pid=%s reason=%s detail=%s restart_in=%.2fs",
        "event=memory_released reason=%s rss_mb=%.0f->%.0f",
        'event=config_reload_skipped reason=no_config_file hint="start with --config FILE"',
    ]:
        assert template_problems(template) == [], template


def test_a_helper_that_logs_the_template_it_is_given_is_read_through_its_callers():
    tree = ast.parse(
        textwrap.dedent(
            """
            import logging
            logger = logging.getLogger("x")

            class Streams:
                def _log_bounded(self, key, text, *args):
                    if args:
                        text, args = text + " not_logged=%d", (*args, 1)
                    logger.warning(text, *args)

                def cut(self, peer):
                    self._log_bounded("k", "event=stream_cut peer=%s", peer)

                def dropped(self, drf):
                    self._log_bounded("k", f"reading for {drf} dropped")
            """
        )
    )
    (call,) = calls_in(tree, "x.py")
    whole, problems = templates(call)
    assert whole == ["event=stream_cut peer=%s"]
    assert problems == ["text is bound to f'reading for {drf} dropped', not a string literal"]
