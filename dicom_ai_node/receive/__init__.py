"""receive: the C-STORE SCP. Writes what arrives to the spool and records it, nothing more."""
