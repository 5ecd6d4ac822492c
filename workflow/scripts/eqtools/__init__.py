"""Shared code of the workflow's rule scripts: data, config, I/O, generation, EM, provenance.

Rule scripts import it as a sibling package (Snakemake puts the script directory on sys.path).
Snakemake does not track imported code, so rules pass a content hash of the modules they use
as a param, derived from the imports (eqtools/codehash.py, `script_code` in
workflow/rules/common.smk).
"""
