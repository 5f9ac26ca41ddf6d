"""Probe-side drivers, one module per assignment: run inside the sandbox, they call a student's classes or
functions in a scripted way (``Call.via = "llmsys_lab.grading.drivers.<module>:<function>"``) and return data only.
Nothing here decides a grade."""
