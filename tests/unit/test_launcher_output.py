"""The child's output pipe as OsLauncher reads it: batches of whole lines, holds that leave
lines in the pipe (no reads, so no wakeups of the router), and release once the child
has exited. Real processes (`sh`), no fakes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path

import pytest

from llamarouter.core.launcher import _LINE_LIMIT, Child, OsLauncher, _AsyncioChild

ENV = {"PATH": "/usr/bin:/bin"}


async def spawn(script: str) -> Child:
    return await asyncio.wait_for(OsLauncher().spawn(["sh", "-c", script], ENV), 10)


def pending_in_pipe(child: Child) -> int:
    """Bytes written by the child and not read by us yet (FIONREAD on the read end)."""
    assert isinstance(child, _AsyncioChild)
    transport = child._output._transport
    assert transport is not None
    pipe = transport.get_extra_info("pipe")
    raw = fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A FIFO the child reads one line from before it goes on, and our end of it."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # a writer exists, so the child's open does not block
    try:
        yield str(path), fd
    finally:
        os.close(fd)


# The router runs on uvloop where it is installed, else on asyncio's own loop.
LOOPS = ("asyncio", "uvloop")


def run_on(loop: str, main: Callable[[tuple[str, int]], Coroutine[object, object, None]], gate: tuple[str, int]) -> None:
    """Run `main(gate)` on that loop (a function, not a coroutine, so that a skip does not
    leave one never awaited)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main(gate))
    else:
        asyncio.run(main(gate))


async def finish(child: Child) -> None:
    """Stop reading and reap the child (an unreaped one warns when collected)."""
    child.close_output()
    await asyncio.wait_for(child.wait(), 10)


async def read_all(child: Child) -> list[bytes]:
    out: list[bytes] = []
    while lines := await asyncio.wait_for(child.read_lines(), 10):
        out += lines
    return out


async def test_lines_come_whole_and_in_order_then_an_empty_batch_at_the_end() -> None:
    child = await spawn("printf 'one\\ntwo\\r\\nthree'; exit 4")
    assert await read_all(child) == [b"one", b"two\r", b"three"]  # an unterminated tail too
    assert await asyncio.wait_for(child.wait(), 10) == 4
    await finish(child)


@pytest.mark.parametrize("loop", LOOPS)
def test_held_output_stays_in_the_pipe_until_released(gate: tuple[str, int], loop: str) -> None:
    run_on(loop, _held_output_stays_in_the_pipe_until_released, gate)


async def _held_output_stays_in_the_pipe_until_released(gate: tuple[str, int]) -> None:
    path, go = gate
    child = await spawn(f"echo loading; read _ < {path}; echo first; echo second")
    assert await asyncio.wait_for(child.read_lines(), 10) == [b"loading"]
    child.hold_output(60.0)
    os.write(go, b"go\n")
    # The child wrote both lines before it exited, and the loop ran on until the exit was
    # seen: unheld, they would have been read by now.
    await asyncio.wait_for(child.wait(), 10)
    assert pending_in_pipe(child) == len(b"first\nsecond\n")
    child.hold_output(60.0)  # a second hold while held changes nothing
    child.release_output()
    assert await read_all(child) == [b"first", b"second"]
    await finish(child)


async def test_after_release_further_holds_are_ignored(gate: tuple[str, int]) -> None:
    """The owner releases the output once the child has exited and then drains it: the
    reader's own hold after the last batch must not hold up that drain."""
    path, go = gate
    child = await spawn(f"echo a; read _ < {path}; echo b")
    assert await asyncio.wait_for(child.read_lines(), 10) == [b"a"]
    os.write(go, b"go\n")
    await asyncio.wait_for(child.wait(), 10)
    child.release_output()
    child.hold_output(60.0)
    assert await read_all(child) == [b"b"]
    await finish(child)


async def test_a_line_longer_than_the_limit_is_cut_not_fatal() -> None:
    size = _LINE_LIMIT + _LINE_LIMIT // 2
    child = await spawn(f"head -c {size} /dev/zero | tr '\\0' x; echo; echo after")
    lines = await read_all(child)
    assert [len(line) for line in lines] == [_LINE_LIMIT, size - _LINE_LIMIT, len(b"after")]
    await finish(child)


async def test_close_ends_a_reader_even_while_a_grandchild_keeps_the_pipe_open() -> None:
    child = await spawn("echo up; sleep 30 & exit 0")
    assert await asyncio.wait_for(child.read_lines(), 10) == [b"up"]
    await asyncio.wait_for(child.wait(), 10)
    reader = asyncio.create_task(child.read_lines())
    child.close_output()
    assert await asyncio.wait_for(reader, 10) == []
    OsLauncher().kill(child)  # the group: the `sleep` too (the child itself is reaped)


async def test_the_pipe_is_grown_where_the_os_allows(gate: tuple[str, int]) -> None:
    path, go = gate
    child = await spawn(f"echo up; read _ < {path}")
    assert await asyncio.wait_for(child.read_lines(), 10) == [b"up"]
    assert isinstance(child, _AsyncioChild)
    transport = child._output._transport
    assert transport is not None
    size = fcntl.fcntl(transport.get_extra_info("pipe").fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
    with open("/proc/sys/fs/pipe-max-size") as f:
        assert size == min(1 << 20, int(f.read()))
    os.write(go, b"go\n")
    assert await read_all(child) == []
    await finish(child)


def _nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice


def _autogroup_of(pid: int | str) -> str | None:
    """The whole line (group and its nice), or None: no autogroup, or a process still in
    the boot session's group (a container's first process), which reads an empty file."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return f.read().strip() or None
    except OSError:
        return None


@pytest.mark.parametrize("loop", LOOPS)  # uvloop runs preexec_fn at another point than asyncio
def test_nicer_children_rank_below_the_router_within_its_session(gate: tuple[str, int], loop: str) -> None:
    """The router's one thread must not queue behind a child's compute threads, and a
    nicer child must not yield to everything else on the host: it stays in the router's
    session (where autogroup ranks threads by nice), in a process group of its own."""
    run_on(loop, _children_run_nicer, gate)


async def _children_run_nicer(gate: tuple[str, int]) -> None:
    path, go = gate
    ours, our_group = _nice_of(os.getpid()), _autogroup_of("self")
    child = await asyncio.wait_for(
        OsLauncher(child_nice=3).spawn(["sh", "-c", f"echo up; read _ < {path}"], ENV), 10
    )
    try:  # a failed check still lets the child go: uvloop would wait for it at close
        assert await asyncio.wait_for(child.read_lines(), 10) == [b"up"]
        assert _nice_of(child.pid) == min(19, ours + 3)
        assert _nice_of(os.getpid()) == ours
        assert os.getsid(child.pid) == os.getsid(0)  # the router's session...
        assert os.getpgid(child.pid) == child.pid  # ...in a group of its own
        assert os.getpgid(0) != child.pid
        assert _autogroup_of(child.pid) == our_group  # so the same autogroup, untouched
        assert _autogroup_of("self") == our_group
    finally:
        os.write(go, b"go\n")
        await finish(child)


@pytest.mark.parametrize("nice", [0, 3])
async def test_a_childs_whole_group_gets_a_kill(gate: tuple[str, int], nice: int) -> None:
    """Stop and kill go to the child's process group, grandchildren included, though the
    child does not lead a session."""
    path, _ = gate
    launcher = OsLauncher(child_nice=nice)
    child = await asyncio.wait_for(
        launcher.spawn(["sh", "-c", f"sh -c 'echo grandchild $$; read _ < {path}' & wait"], ENV), 10
    )
    line = await asyncio.wait_for(child.read_lines(), 10)
    grandchild = int(line[0].split()[1])
    assert os.getpgid(grandchild) == child.pid
    launcher.kill(child)
    assert await asyncio.wait_for(child.wait(), 10) != 0
    deadline = asyncio.get_running_loop().time() + 10
    while _alive(grandchild):  # reaped by init once killed: poll for it, bounded
        assert asyncio.get_running_loop().time() < deadline, "the grandchild outlived the kill"
        await asyncio.sleep(0.01)
    child.close_output()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("loop", LOOPS)
def test_children_share_the_routers_session_in_a_group_of_their_own(gate: tuple[str, int], loop: str) -> None:
    """As upstream's router keeps them: a child in a session of its own would be a
    scheduling group of its own under autogroup, and the router's one thread would wait
    for a CPU behind its compute threads while a burst of requests comes in."""
    run_on(loop, _children_share_the_session, gate)


async def _children_share_the_session(gate: tuple[str, int]) -> None:
    path, go = gate
    our_group = _autogroup_of("self")
    child = await asyncio.wait_for(
        OsLauncher(child_nice=0).spawn(["sh", "-c", f"echo up; read _ < {path}"], ENV), 10
    )
    try:
        assert await asyncio.wait_for(child.read_lines(), 10) == [b"up"]
        assert _nice_of(child.pid) == _nice_of(os.getpid())  # nice 0: as the router
        assert os.getsid(child.pid) == os.getsid(0)  # the router's session...
        assert os.getpgid(child.pid) == child.pid  # ...in a group of its own
        assert os.getpgid(0) != child.pid
        assert _autogroup_of(child.pid) == our_group
    finally:
        os.write(go, b"go\n")
        await finish(child)
