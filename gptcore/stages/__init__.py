"""The pipeline stages, one module each with its `main(argv)`: dvc.yaml runs them through the thin scripts
of stages/ (`python -m stages.NAME`), and `python -m gptcore NAME` imports them from the installed package."""
