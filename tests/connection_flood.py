"""Holds silent connections against a port, reopening each as soon as the server closes it.

    python connection_flood.py PORT SOCKETS SECONDS SOURCE [SOURCE ...]

Opens SOCKETS TCP connections to 127.0.0.1:PORT, spread round-robin over the SOURCE
addresses (loopback only: 127.0.0.2, 127.0.0.3, ... stand for several clients), sends
nothing on them, and opens a new one for each the server closes or resets. Prints
``started`` once SOCKETS connections were opened, stops by itself after SECONDS and prints
``opened=<connections opened> closed=<of them closed or reset by the server>``.
"""

import asyncio
import sys


async def hold(port: int, source: str, stop_at: float, counts: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except ConnectionError:
            counts["opened"] += 1
            counts["closed"] += 1  # reset by the server before the client saw it open
            continue
        except OSError:
            await asyncio.sleep(0.01)  # the backlog is full: try again
            continue
        counts["opened"] += 1
        try:
            await asyncio.wait_for(reader.read(1), max(0.0, stop_at - loop.time()))
            counts["closed"] += 1  # by the server
        except ConnectionError:
            counts["closed"] += 1  # reset by the server
        except TimeoutError:
            pass  # still held at the end
        writer.transport.abort()


async def main(port: int, sockets: int, seconds: float, sources: list[str]) -> None:
    loop = asyncio.get_running_loop()
    counts = {"opened": 0, "closed": 0}
    stop_at = loop.time() + seconds
    tasks = [loop.create_task(hold(port, sources[i % len(sources)], stop_at, counts)) for i in range(sockets)]
    while counts["opened"] < sockets and loop.time() < stop_at:
        await asyncio.sleep(0.01)
    print("started", flush=True)
    await asyncio.gather(*tasks)
    print(f"opened={counts['opened']} closed={counts['closed']}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
