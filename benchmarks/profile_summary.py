"""Summarize py-spy profiles (raw format, `--native --threads --function`) of the front.

    python -m benchmarks.profile_summary PROFILE.txt [--top N] [--ours pacsys/,workers/]

`bench_capacity --profile DIR` records them (several files of one load may be concatenated:
the raw format adds up). py-spy samples a thread that is not idle, which includes one that
waits in a system call or sits preempted in one, so shares are shares of the process's
samples, close to but not the same as its CPU time. Printed:

- how many samples were waits (a poller's epoll_wait, a lock or condition wait, a Python
  thread's blocking read); they are left out of every share below;
- per thread: its share of the samples;
- by the code running at the sample (the deepest frame): our Python (a frame of ours is the
  deepest Python frame; the frames that start the event loop do not count as ours), told
  apart when the sample is in a system call it made (a write to a worker's pipe, say);
  library or runtime code our code called (the nearest frame of ours is further up: asyncio,
  dataclasses' generated `__init__`, protobuf, ...); and the rest, which our code did not
  call: the event loop, gRPC's Cython layer and C core, its threads;
- the native library the deepest frame is in (grpc's extension holds the C core and the Cython
  layer, libpython is the interpreter, libc its system calls and copies), and the system calls
  by their caller. On a machine busier than its cores, a thread preempted inside a system call
  is sampled there too: system calls then look dearer than their CPU time;
- our functions ranked by inclusive share (the samples with the function anywhere on the stack)
  with their self share (our function is the deepest Python frame);
- what our code calls into: the deepest Python frame outside our code, under its nearest caller
  of ours.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass

FRAME = re.compile(r"^(?P<name>.*) \((?P<where>[^()]*)\)$")


@dataclass(frozen=True)
class Frame:
    name: str
    where: str  # file:line for Python, the library for native frames

    @property
    def python(self) -> bool:
        return ".py:" in self.where or self.where.startswith(("<frozen", "<string>"))

    @property
    def file(self) -> str:
        return self.where.rsplit(":", 1)[0] if self.python else self.where

    def label(self) -> str:
        return f"{self.file}:{self.name}"


def parse_frame(text: str) -> Frame:
    match = FRAME.match(text)
    return Frame(match["name"], match["where"]) if match else Frame(text, "?")


def read_samples(path: str) -> list[tuple[str, list[Frame], int]]:
    """(thread, frames root first, count) per line of a raw py-spy file."""
    samples = []
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            parts = stack.split(";")
            thread = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread ") else "?"
            frames = [parse_frame(p) for p in (parts[1:] if parts[0].startswith("thread ") else parts)]
            samples.append((thread, frames, int(count)))
    return samples


# Leaf functions where a thread waits rather than computes (py-spy samples a thread sitting in
# them as running): the pollers' waits, lock and condition waits.
WAITS = {
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "select",
    "pselect",
    "nanosleep",
    "clock_nanosleep",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
}
WAIT_CALLERS = {"PyThread_acquire_lock_timed", "take_gil", "PyCOND_TIMEDWAIT", "PyCOND_WAIT"}


def library(frame: Frame) -> str:
    if frame.python:
        return "Python code (interpreted)"
    where = frame.where
    if "cygrpc" in where:
        return "grpc extension (C core, Cython layer)"
    if "libpython" in where or where.startswith(("ceval.c", "object.h", "obmalloc.c")):
        return "libpython (interpreter)"
    if "libc.so" in where:
        return "libc"
    if where.startswith(("loop.c", "core.c", "linux.c", "stream.c", "uv")) or "uvloop" in where:
        return "uvloop extension (libuv)"
    if "_message" in where or "upb" in where or "protobuf" in where:
        return "protobuf extension"
    if "msgspec" in where:
        return "msgspec extension"
    if where.startswith(("socketmodule.c",)):
        return "Python socket module"
    if where.startswith(("_asynciomodule.c",)):
        return "asyncio C module"
    return where


def is_wait(frames: list[Frame]) -> bool:
    if not frames:
        return False
    if frames[-1].name in WAITS:
        return True
    if frames[-1].name == "read" and len(frames) > 1 and frames[-2].python:
        return True  # a blocking read by Python code in a thread (a server's stdin, for one)
    return any(f.name in WAIT_CALLERS for f in frames[-5:])


def syscall_label(frames: list[Frame]) -> str | None:
    """`name by whom` when the deepest frame is a libc system call wrapper, else None."""
    leaf = frames[-1]
    if "libc.so" not in leaf.where:
        return None
    caller = next((f for f in reversed(frames) if "libc.so" not in f.where), None)
    if leaf.name == "syscall":
        what = "syscall() (futex: a lock's wait or wake)"
    elif leaf.name.startswith("0x"):
        what = "libc (no symbol)"
    else:
        what = leaf.name
    if any(f.name == "eventfd_write" for f in frames[-3:]):
        what = "write (eventfd_write: a poller wake-up)"
    return f"{what} by {library(caller) if caller else '?'}"


def loop_start(frames: list[Frame]) -> int:
    """Index of the frame that runs the event loop (frames before it only start it), or 0."""
    for i, f in enumerate(frames):
        if f.name.endswith("run_forever") or f.name.endswith("run_until_complete"):
            return i
    return 0


def pct(n: int, total: int) -> str:
    return f"{100 * n / total:5.1f}%"


def summarize(path: str, top: int, ours: tuple[str, ...], us_per_call: float | None) -> None:
    samples = read_samples(path)
    total = sum(n for _, _, n in samples)
    waits = sum(n for _, frames, n in samples if is_wait(frames))
    cpu = total - waits
    print(f"== {path}: {total} samples, {waits} waiting (left out below), {cpu} running")
    if not cpu:
        return

    def is_ours(frame: Frame) -> bool:
        return frame.python and any(prefix in frame.file for prefix in ours)

    def share(n: int) -> str:
        text = pct(n, cpu)
        return f"{text} {n / cpu * us_per_call:6.1f} us" if us_per_call else text

    threads: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    syscalls: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    callees: Counter[tuple[str, str]] = Counter()
    rest: Counter[str] = Counter()
    for thread, frames, n in samples:
        if is_wait(frames):
            continue
        threads[thread] += n
        libs[library(frames[-1])] += n
        call = syscall_label(frames)
        if call is not None:
            syscalls[call] += n
        served = frames[loop_start(frames) :]  # what the loop runs; the frames that started it are left out
        for label in {f.label() for f in served if is_ours(f)}:
            inclusive[label] += n
        deepest_python = next((f for f in reversed(served) if f.python), None)
        nearest_ours = next((f for f in reversed(served) if is_ours(f)), None)
        if deepest_python is not None and is_ours(deepest_python):
            kinds["our Python (self): system calls it made" if call else "our Python (self)"] += n
            self_time[deepest_python.label()] += n
        elif nearest_ours is not None:
            kinds["called by our code (library, runtime, system calls)"] += n
            callee = deepest_python.label() if deepest_python is not None else library(frames[-1])
            callees[(nearest_ours.label(), callee)] += n
        else:
            kinds["not called by our code (event loop, gRPC, its threads)"] += n
            native = f"{library(frames[-1])}" + (f": {call}" if call else "")
            rest[deepest_python.label() + " > " + native if deepest_python else native] += n

    unit = " (share of running samples, and per call)" if us_per_call else " (share of running samples)"
    print("threads" + unit + ":")
    for thread, n in threads.most_common():
        print(f"  {share(n)}  {thread}")
    print("by what runs:")
    for kind, n in kinds.most_common():
        print(f"  {share(n)}  {kind}")
    print("deepest frame's library:")
    for lib, n in libs.most_common(8):
        print(f"  {share(n)}  {lib}")
    print("system calls (deepest frame a libc wrapper), by caller:")
    for label, n in syscalls.most_common(10):
        print(f"  {share(n)}  {label}")
    print(f"our functions (inclusive; self), top {top}:")
    for label, n in inclusive.most_common(top):
        print(f"  {share(n)}  {pct(self_time[label], cpu)}  {label}")
    print(f"code our code calls (under its nearest caller of ours), top {top}:")
    for (caller, callee), n in callees.most_common(top):
        print(f"  {share(n)}  {callee}  <- {caller}")
    print(f"not called by our code (deepest Python frame > deepest native), top {top}:")
    for label, n in rest.most_common(top):
        print(f"  {share(n)}  {label}")
    print()


def callees_of(path: str, name: str, depth: int, us_per_call: float | None) -> None:
    """The call tree under every function whose label ends with `name`, `depth` levels deep."""
    samples = [(frames, n) for _, frames, n in read_samples(path) if not is_wait(frames)]
    cpu = sum(n for _, n in samples)
    tree: Counter[tuple[str, ...]] = Counter()
    for frames, n in samples:
        at = next((i for i, f in enumerate(frames) if f.label().endswith(name)), None)
        if at is None:
            continue
        below = [f.label() if f.python else library(f) for f in frames[at + 1 :]]
        for d in range(min(depth, len(below)) + 1):
            tree[tuple(below[:d])] += n
        if len(below) < depth:
            tree[(*below, "(self)")] += n
    print(f"== {path}: under {name} ({cpu} running samples)")
    for key in sorted(tree, key=lambda k: (k[:1], -tree[k[:1]] if k else 0, k)):
        n = tree[key]
        if n * 200 < cpu:  # below 0.5%
            continue
        text = pct(n, cpu) + (f" {n / cpu * us_per_call:6.1f} us" if us_per_call else "")
        print(f"  {text}  {'  ' * len(key)}{key[-1] if key else name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", help="py-spy raw files")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ours", default="pacsys/,workers/", help="comma-separated path parts of our code")
    parser.add_argument(
        "--us-per-call",
        type=float,
        help="the process's CPU microseconds per call (or reply): shares in microseconds too",
    )
    parser.add_argument("--callees", metavar="FUNCTION", help="print the call tree under FUNCTION (a label's end)")
    parser.add_argument("--depth", type=int, default=3, help="levels of --callees (default 3)")
    args = parser.parse_args(argv)
    ours = tuple(p for p in args.ours.split(",") if p)
    for path in args.profiles:
        if args.callees:
            callees_of(path, args.callees, args.depth, args.us_per_call)
        else:
            summarize(path, args.top, ours, args.us_per_call)


if __name__ == "__main__":
    main()
