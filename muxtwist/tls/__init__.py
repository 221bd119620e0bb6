"""
TLS termination: a certificate chosen by the client's SNI, ALPN negotiation,
and the decrypted stream handed to an inner factory (often another
:class:`~muxtwist.sniffing.SniffingFactory`) once the handshake is done, with
the SNI, the negotiated protocol and the client certificate in its
:class:`~muxtwist.interfaces.ConnectionInfo`.

The facade of the package; each concern has a module of its own:

- ``_terminate``: the :class:`TerminateTLS` factory, its TLS contexts and
  its limits on handshakes in progress;
- ``_certificates``: certificate files by host name, read, checked and
  chosen by SNI;
- ``_alpn``: the ALPN protocols offered by default (:func:`offered_protocols`);
- ``_handshake``: one connection until its handshake is done, then the
  hand-over to the inner factory.
"""

from muxtwist.tls import _certificates
from muxtwist.tls._alpn import offered_protocols
from muxtwist.tls._certificates import CertificateError
from muxtwist.tls._terminate import TerminateTLS, reload_all_certificates

#: The name, in a certificate directory or mapping, of the certificate for
#: clients that send no SNI or a name nothing else covers.
DEFAULT = _certificates.DEFAULT

__all__ = ["DEFAULT", "CertificateError", "TerminateTLS", "offered_protocols", "reload_all_certificates"]

for _public in (CertificateError, TerminateTLS, offered_protocols, reload_all_certificates):
    # Named where they are imported from, as before the package was split:
    # the API reference documents each once, under that name.
    _public.__module__ = __name__
del _public
