"""The audit trail: DICOM audit messages (PS3.15 A.5) in the job log and, optionally, sent
to a syslog audit repository (RFC 5424 over TCP or TLS), as IHE ATNA asks."""
