"""The HTTP gateway: TEI's and OpenAI's embedding APIs in front of the queue.

A producer like the SDK (one reply stream per gateway process); it holds no model and
never imports torch, so any number of gateways can run side by side.
"""
