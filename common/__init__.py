"""The leaf layer shared by producers and workers.

Wire schema, msgpack codec, Redis key names, error tree and connection settings.
Nothing here imports ``embedq.producer``, ``embedq.worker`` or torch.
"""
