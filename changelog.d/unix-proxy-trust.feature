`accept_proxy_protocol` takes the entry `"unix"`: every peer of a UNIX-socket listener is trusted to send a PROXY header, so HAProxy can reach muxtwist through a unix socket with `send-proxy-v2`.
