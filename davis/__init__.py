"""DAVIS-2017 in one place: the folder format and result CSVs (io), the official J&F metrics
(metrics) and a DAVIS-format sample generated from real video (sample). Used by jobs/ (and
by anything below it that needs DAVIS files); imports nothing of pipeline/ or jobs/."""
