from lmdistill.cli import run

run()
