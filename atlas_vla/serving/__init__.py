"""Serving Atlas over the network: openpi's websocket protocol, the batched server and a client."""
