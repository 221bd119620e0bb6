`TerminateTLS` passes a reload's `retiring()` on to the factory behind it, so a WSGI or ASGI target served over TLS also closes its idle keep-alive connections when a reload replaces it.
