"""The ICH triage node: DICOM service, worker, triage rules, outputs and the `ichnode` CLI."""
