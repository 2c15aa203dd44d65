"""WebSocket signaling for the video rooms.

``messages`` (schema and validation) and ``rooms`` (room logic) are pure; ``ice`` builds the
ICE server list handed to browsers; ``server`` is the aiohttp application that serves the
page, the WebSocket and the TURN REST credentials endpoint.
"""
