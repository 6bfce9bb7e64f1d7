"""The CDR drop-folder probe: the SFTP folder against `cdr_data.files`, seen from outside the
loader (docs/monitoring.md)."""
