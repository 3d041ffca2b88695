"""The gateway: a facility's sources and destinations, run unattended (:mod:`.runner`), and
the delivery of arrived packages to its destinations (:mod:`.inbound`)."""
