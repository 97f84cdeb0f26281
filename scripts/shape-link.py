#!/usr/bin/env python3
"""A slow network link in user space: a TCP proxy that limits throughput and adds a
one-way delay in each direction (this kernel has no tc qdiscs), for the fleet benchmark.

  shape-link.py TARGET_HOST:PORT --mbit 20 --delay-ms 20 --port-file FILE [--listen PORT]

It listens on 127.0.0.1 (a free port unless --listen is given), writes that port to
--port-file once it accepts connections, and forwards every connection to TARGET. All
connections share one link: each direction is one serializer of --mbit Mbit/s (bytes
queue behind each other, across connections, in the order they were read) followed by
--delay-ms of propagation delay. A connection reads its next chunk only once its last
one has left the serializer, so a busy sender is held back by TCP flow control, as on
a real slow link, rather than buffered here. Runs until killed.
"""
import argparse
import asyncio
import os
import sys

CHUNK = 16 * 1024


class Direction:
    """One direction of the link: a serializer shared by every connection, then a delay."""

    def __init__(self, bytes_per_s, delay_s):
        self.bytes_per_s = bytes_per_s
        self.delay_s = delay_s
        self.busy_until = 0.0
        self.bytes = 0

    def reserve(self, n):
        """When a chunk of n bytes read now has left the serializer."""
        now = asyncio.get_running_loop().time()
        self.busy_until = max(now, self.busy_until) + n / self.bytes_per_s
        self.bytes += n
        return self.busy_until


async def pipe(reader, writer, link):
    """Copies reader to writer through `link`; half-closes writer at reader's end."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            at, data = await queue.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    delivery = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            sent = link.reserve(len(data))
            queue.put_nowait((sent + link.delay_s, data))
            wait = sent - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        queue.put_nowait((loop.time() + link.delay_s, None))
        await delivery
    finally:
        delivery.cancel()


async def serve(args):
    target_host, _, target_port = args.target.rpartition(":")
    rate = args.mbit * 1e6 / 8
    up = Direction(rate, args.delay_ms / 1000)  # client -> target
    down = Direction(rate, args.delay_ms / 1000)  # target -> client

    async def handle(client_r, client_w):
        try:
            target_r, target_w = await asyncio.open_connection(target_host or "127.0.0.1", int(target_port))
        except OSError as e:
            print(f"shape-link: cannot reach {args.target}: {e}", file=sys.stderr)
            client_w.close()
            return
        try:
            await asyncio.gather(pipe(client_r, target_w, up), pipe(target_r, client_w, down))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (client_w, target_w):
                w.close()

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    except OSError as e:
        sys.exit(f"shape-link: cannot listen on 127.0.0.1:{args.listen}: {e}\n"
                 "hint: pick another port with --listen, or leave it out for a free one")
    listening = server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{listening}\n")
        os.replace(tmp, args.port_file)
    else:
        print(listening, flush=True)
    async with server:
        await server.serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="HOST:PORT to forward to")
    p.add_argument("--mbit", type=float, default=20.0, help="throughput per direction, Mbit/s")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per direction, ms")
    p.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--port-file", help="write the listening port here (default: stdout)")
    args = p.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
