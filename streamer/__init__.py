"""streamer: the asyncio server that streams live generation to browsers (imports packcache, never the reverse).

    protocol.py   sans-I/O control protocol: parse/validate client messages, render server messages, limits
    config.py     ServerConfig
    server.py     StreamServer: HTTP + websocket on one port, admission, sessions, signaling, shutdown
    session.py    StreamSession: one engine session driven into a bounded frame buffer
    scheduler.py  DeviceWorker: one thread per device, sessions take turns chunk by chunk
    track.py      PacedVideoTrack: exact 16 FPS on the 90 kHz clock, repeats the last frame on underrun
    recorder.py   fragmented-MP4 recording
    metrics.py    Prometheus text format
    client.py     StreamClient: a Python client (scripts, tests, bench.serve)
    cluster/      many workers on Ray behind one front door (optional: needs the [cluster] extra)

The wire protocol is documented in docs/protocol.md.
"""
