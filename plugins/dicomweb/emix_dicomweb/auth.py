"""How emix authenticates to a PACS's DICOMweb service (a name list, light to import)."""

#: ``none``, HTTP Basic, a bearer token, or a TLS client certificate.
AUTH_KINDS = ("none", "basic", "bearer", "cert")
