"""UME-R1 trainers."""
