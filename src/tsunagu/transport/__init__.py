"""asyncio transports: the only place on the server side that touches sockets."""
