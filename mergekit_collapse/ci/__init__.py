"""The guard as a CI check: many configs, GitHub annotations and job summary, SARIF, validation.

`discover` picks the configs (files, globs, folders, `--changed-since`), `results` runs the guard on
each and turns reports into findings, `locate` finds their lines in the YAML, `github` and `sarif`
format them, and `validate` is the fast, model-free check behind the pre-commit hook.
"""
