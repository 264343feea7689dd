"""--host A,B (llama-server's comma-separated listen addresses) and a failed bind."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import StartRouter
from tests.fakes.helpers import free_port, wait_for, write_fake_model


async def test_every_host_address_answers(tmp_path: Path, start_router: StartRouter) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf")
    sock = str(tmp_path / "router.sock")
    r = await start_router("--models-dir", str(tmp_path / "models"), "--host", f"127.0.0.1,127.0.0.2,{sock}")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.2:{r.port}/health") as resp:
            assert resp.status == 200
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as unix, \
                unix.get("http://localhost/v1/models") as resp:
            assert resp.status == 200 and [m["id"] for m in (await resp.json())["data"]] == ["alpha"]
    assert (await r.get("/health"))[0] == 200


async def test_a_busy_address_is_a_startup_error(tmp_path: Path, start_router: StartRouter) -> None:
    # The second address is taken: the router must exit 1 saying which, and start no child
    # (every address is bound before anything is spawned, in -m mode too).
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", port))
        busy.listen()
        model = write_fake_model(tmp_path / "solo.gguf")
        r = await start_router("-m", str(model), "--host", "127.0.0.1,127.0.0.2", "--port", str(port), wait=False)
        code = await wait_for(lambda: r.proc.returncode, 30, interval=0.05, message="the router to exit")
    assert code == 1
    assert f"llamarouter: error: couldn't bind HTTP server socket, hostname: 127.0.0.2, port: {port}" in r.log()
    assert "[solo] stopped -> starting" not in r.log()  # nothing was spawned

    def children_of_this_model() -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if str(model) in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.info["pid"])
        return found

    await wait_for(lambda: not children_of_this_model(), 10, message="the child to be stopped")


async def test_port_zero_with_two_addresses_is_refused(tmp_path: Path, start_router: StartRouter) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf")
    r = await start_router("--models-dir", str(tmp_path / "models"), "--host", "127.0.0.1,127.0.0.2",
                           "--port", "0", wait=False)
    assert await wait_for(lambda: r.proc.returncode, 30, interval=0.05) == 2
    assert "--port 0 is not supported with multiple TCP addresses" in r.log()
